"""Segmenters for the mIoU metric: label maps of ground truths and reconstructions, one command each.

Every segmenter is a command ``SEGMENTER IN_DIR OUT_DIR`` that reads each ``IN_DIR/NAME.png`` (sorted) and
writes ``OUT_DIR/NAME.png``: an 8-bit single-channel ("L") map of the input's size, a class index per pixel,
255 for no class. eval.py runs it as a subprocess and checks its exit status and maps.

- :mod:`~dynadiff.segmenters.mask2former`: Mask2Former (COCO panoptic, 133 categories) through transformers,
  in this project's environment; not comparable with the paper's ViT-Adapter numbers.

Importing this package imports neither torch nor transformers.
"""
