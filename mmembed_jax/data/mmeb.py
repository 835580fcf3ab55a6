"""MMEB (v1) dataset names (METHODS.md §4), shared by the recipes and the evaluators."""

# The 20 training sets of MMEB-train (the in-distribution half of the benchmark).
MMEB_TRAIN = ("ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA",
              "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR",
              "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
              "MSCOCO")
