"""Speed and memory of fcos-d2 against Detectron2's FCOS and RetinaNet and torchvision's FCOS.

Run ``python benchmarks/run.py --help``; docs/benchmarks.md describes what is measured.
"""
