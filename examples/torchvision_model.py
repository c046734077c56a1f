"""A torchvision model through dwconvert: inspect, convert, save, load, export.

The weights are random (``torchvision.models.resnet18()`` without downloading
anything), so the errors printed are those of random kernels, which are close to
full rank and lose more than trained ones; put your trained weights in with
``model.load_state_dict(...)`` to see real numbers. About two minutes on 2 CPU
cores at 224x224, most of it CP decompositions.

    python examples/torchvision_model.py --model resnet18 --budget 0.5 -o resnet18-dw.safetensors
"""

from __future__ import annotations

import argparse

import torch
import torchvision

import dwconvert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision.models builder")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("-o", "--output", default=None, help="save the converted model here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one LAPACK thread is faster on a shared machine

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()  # random weights, no download
    x = torch.randn(1, 3, args.image_size, args.image_size)

    print(dwconvert.inspect(model, x, fractions=(args.budget,)).summary())
    small = dwconvert.convert(model, budget=args.budget, example_inputs=x)
    print(small.dwconvert_report.summary())

    with torch.no_grad():
        before, after = model(x), small(x)
    change = float((after - before).norm() / before.norm())
    print(f"relative change of the logits on a random input: {change:.3f} (random weights)")
    if args.output:
        dwconvert.save(small, args.output, arch=f"torchvision.models:{args.model}",
                       extra={"input_shape": list(x.shape)})
        print(f"wrote {args.output}; export it with: dwconvert export {args.output} "
              "--onnx model.onnx")


if __name__ == "__main__":
    main()
