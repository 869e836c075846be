"""Every config key fcos_d2 adds to Detectron2's defaults, in one place: :func:`add_fcos_config`.

``MODEL.FCOS.*`` names follow the authors' Detectron2 release (AdelaiDet) wherever it has one, so
that their YAML files carry over; keys marked "ours" cover choices their release hard-codes. The
defaults are the authors' improved settings (Table 3, "Improvements" rows);
``configs/FCOS-Detection/paper/`` switches back to the ICCV 2019 settings.
"""

from detectron2.config import CfgNode as CN

from .authors import add_authors_keys


def add_fcos_config(cfg: CN) -> CN:
    """Add all fcos_d2 keys to ``cfg`` (in place) and return it. Safe to call more than once.

    After it, ``cfg.merge_from_file`` accepts every YAML file shipped in ``configs/``.
    """
    if "FCOS" not in cfg.MODEL:
        _add_model_keys(cfg)
    if "OPTIMIZER" not in cfg.SOLVER:
        _add_solver_keys(cfg)
    if "SHAPES" not in cfg.DATASETS:
        _add_dataset_keys(cfg)
    if "COCO_JSON" not in cfg.DATASETS:
        _add_user_dataset_keys(cfg)
    if "MOBILENET" not in cfg.MODEL:
        add_authors_keys(cfg)
    if "BOX_VOTING" not in cfg.TEST.AUG:
        _add_test_keys(cfg)
    if "SLICE" not in cfg.TEST:
        _add_slice_keys(cfg)
    return cfg


def _add_slice_keys(cfg: CN) -> None:
    # ours: sliced inference for small objects in large images (fcos_d2/inference/slicing.py),
    # used by FCOSPredictor (demo.py) and available to evaluation: the original image is cut into
    # overlapping SIZE x SIZE tiles (each resized like any input by INPUT.MIN/MAX_SIZE_TEST, so a
    # tile of the test size is seen at its own pixels), the detector runs on the tiles (BATCH_SIZE
    # per pass) and, with FULL_IMAGE, on the whole resized image too; the boxes are mapped back and
    # merged per class by MERGE: "nms" (at MODEL.FCOS.NMS_TH) or "voting" (NMS, then each kept box
    # the score-weighted mean of its cluster). DROP_CUT_BOXES drops a tile's box that touches an
    # inner border of its tile when another tile sees that box whole. SIZE must be at least the
    # largest stride; OVERLAP (a share of SIZE) in [0, 1).
    cfg.TEST.SLICE = CN(
        {
            "ENABLED": False,
            "SIZE": 512,
            "OVERLAP": 0.2,
            "FULL_IMAGE": True,
            "MERGE": "nms",
            "DROP_CUT_BOXES": True,
            "BATCH_SIZE": 4,
        }
    )


def _add_test_keys(cfg: CN) -> None:
    # ours: test-time augmentation (TEST.AUG.ENABLED, fcos_d2/inference/tta.py) merges the
    # detections of all augmented inputs with per-class NMS; with box voting each kept box becomes
    # the score-weighted mean of the same-class boxes overlapping it at IoU >= MODEL.FCOS.NMS_TH.
    cfg.TEST.AUG.BOX_VOTING = False
    # ours: at each evaluation also the training losses on the test sets ("validation/..." in the
    # results, metrics.json and TensorBoard; FCOS detector only; fcos_d2/inference/validation.py).
    cfg.TEST.VAL_LOSS = False


def _add_solver_keys(cfg: CN) -> None:
    # "SGD" (Detectron2's) or "ADAMW" (same parameter groups, torch.optim.AdamW).
    cfg.SOLVER.OPTIMIZER = "SGD"
    # ours: what SOLVER.AMP.ENABLED (and TEST.AMP.ENABLED) means on a CPU (fcos_d2/precision.py):
    # "auto" bfloat16 autocast only where the CPU computes bfloat16 natively (AVX512-BF16 / AMX),
    # float32 elsewhere; "always" bfloat16 also where it is emulated (slower); "never" float32.
    # On CUDA, SOLVER.AMP.ENABLED is Detectron2's float16 AMP.
    cfg.SOLVER.AMP.CPU_BF16 = "auto"
    # ours: mixed-precision inference (DefaultPredictor, demo.py, evaluation): float16 on CUDA,
    # bfloat16 on CPUs by SOLVER.AMP.CPU_BF16. Off by default: it changes AP slightly (README).
    cfg.TEST.AMP = CN({"ENABLED": False})
    # ours: channels-last (NHWC) memory format for the FCOS detector's weights and inputs. None
    # (default): NHWC on x86-64 CPUs, where oneDNN runs it faster (README, "Speed"), NCHW
    # elsewhere (CUDA: not measured); True / False force it (fcos_d2/modeling/fcos.py).
    cfg.MODEL.CHANNELS_LAST = None
    # ours: exponential moving average of the weights (fcos_d2/engine/ema.py): evaluations during
    # training use it and model_final.pth holds it. Off by default (README: it did not help the
    # quickstart's short schedule).
    cfg.MODEL_EMA = CN({"ENABLED": False, "DECAY": 0.999})
    # ours: keep model_best.pth, the weights that scored best on METRIC ("<task>/<name>" as in
    # metrics.json, e.g. "bbox/AP50", or "validation/total_loss" with TEST.VAL_LOSS) at the
    # evaluations (TEST.EVAL_PERIOD), MODE "max" or "min"; "" (default) keeps none
    # (fcos_d2/engine/best_checkpoint.py).
    cfg.SOLVER.BEST_CHECKPOINT = CN({"METRIC": "", "MODE": "max"})


def _add_dataset_keys(cfg: CN) -> None:
    # Detectron2's INPUT.MIN_SIZE_TRAIN_SAMPLING ("choice", "range") also takes "choice_per_batch"
    # (ours, no new key): one size of MIN_SIZE_TRAIN per batch, not per image. Our Trainer's
    # loader reads it (fcos_d2/data/augmentation.py); Detectron2's own DatasetMapper refuses it.
    # The embedded "shapes" dataset (fcos_d2/data/shapes.py), registered as shapes_train/shapes_val
    # (and shapes_large_val, below).
    cfg.DATASETS.SHAPES = CN()
    shapes = cfg.DATASETS.SHAPES
    shapes.ROOT = ""  # "" -> $FCOS_D2_DATASETS, else <repository>/datasets
    shapes.NUM_TRAIN = 512
    shapes.NUM_VAL = 128
    shapes.IMAGE_SIZE = [256, 256]  # height, width
    shapes.MAX_OBJECTS = 6
    shapes.SEED = 0
    # The large-image split shapes_large_val (ours): many small objects in large images, for
    # sliced inference (TEST.SLICE.*). Objects' longer side is log-uniform from 10 px to
    # LARGE_MAX_OBJECT_SIDE px; seed DATASETS.SHAPES.SEED + 2000.
    shapes.NUM_LARGE_VAL = 32
    shapes.LARGE_IMAGE_SIZE = [1024, 1024]  # height, width
    shapes.LARGE_MAX_OBJECTS = 60
    shapes.LARGE_MAX_OBJECT_SIDE = 64.0


def _add_user_dataset_keys(cfg: CN) -> None:
    # Your own data, registered by path before anything is built (fcos_d2/data/user_datasets.py);
    # relative paths are relative to the working directory.
    # ((name, json file, image folder), ...): COCO json, through register_coco_instances.
    cfg.DATASETS.COCO_JSON = ()
    # ((name, VOC directory, split), ...): Pascal VOC layout, through register_pascal_voc.
    cfg.DATASETS.VOC_DIR = ()
    # Class names of the VOC_DIR datasets; empty: the sorted names found in their annotations.
    cfg.DATASETS.VOC_CLASSES = ()


def _add_model_keys(cfg: CN) -> None:
    cfg.MODEL.FCOS = CN()
    fcos = cfg.MODEL.FCOS
    fcos.NUM_CLASSES = 80
    fcos.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    fcos.FPN_STRIDES = [8, 16, 32, 64, 128]
    # Number of extra FPN levels on top of P5 (2: P6 and P7, as in the paper).
    fcos.TOP_LEVELS = 2
    # ours: what P6 is computed from: "p5" (paper default, Sec. 3.2) or "res5" (C5, as RetinaNet;
    # Table 3 row "C5").
    fcos.TOP_LEVELS_IN_FEATURE = "p5"
    fcos.PRIOR_PROB = 0.01
    # The *_TRAIN inference keys exist so the authors' YAML files load; the detector does not infer
    # during training, and the proposal generator takes its train/test selection from MODEL.RPN.*.
    fcos.INFERENCE_TH_TRAIN = 0.05
    fcos.INFERENCE_TH_TEST = 0.05
    fcos.NMS_TH = 0.6
    fcos.PRE_NMS_TOPK_TRAIN = 1000
    fcos.PRE_NMS_TOPK_TEST = 1000
    fcos.POST_NMS_TOPK_TRAIN = 100
    # Detections per image: 0 follows TEST.DETECTIONS_PER_IMAGE (Detectron2's key); the authors'
    # YAML files may set it, and then it must agree with TEST.DETECTIONS_PER_IMAGE.
    fcos.POST_NMS_TOPK_TEST = 0
    # ours: per-class operating points, one score per class (or empty: none). After NMS a
    # detection is kept only if its final score is >= its class's value; INFERENCE_TH_TEST still
    # selects the candidates before NMS. Honoured by FCOSPredictor, demo.py, evaluation and the
    # exported model; `python -m fcos_d2.analysis thresholds` computes them on a validation set.
    fcos.CLASS_THRESHOLDS = ()
    fcos.NORM = "GN"  # "GN", "BN" (one per level), "SyncBN", or "" / "none" (no norm)
    fcos.USE_SCALE = True
    # Filter candidates on cls * quality instead of cls alone.
    fcos.THRESH_WITH_CTR = False
    # ours: compare INFERENCE_TH_TEST with the final score (sqrt(cls * quality) with SCORE_SQRT)
    # instead of cls (torchvision's FCOS: 0.2 on sqrt(cls * ctr)); not with THRESH_WITH_CTR.
    fcos.THRESH_ON_SCORE = False
    # ours: what ranks each level's candidates for PRE_NMS_TOPK_TEST: "cls_quality" (cls * quality,
    # the authors'), "cls" (the class score alone, mmdetection's) or "score" (the final score,
    # torchvision's; the order of "cls_quality" except where the square root rounds two values
    # to one).
    fcos.PRE_NMS_RANKING = "cls_quality"
    # ours: when >= 0, detections whose clipped width or height is not above it are dropped
    # before NMS (mmdetection's test_cfg.min_bbox_size, 0 in its FCOS configs); negative (default):
    # none are, and Detectron2 drops empty boxes after NMS and the top TEST.DETECTIONS_PER_IMAGE.
    fcos.MIN_BOX_SIZE_TEST = -1.0
    # ours: where each level's locations lie (fcos_d2/modeling/box_ops.py): "half_stride" (the
    # paper's (floor(s/2) + x s, floor(s/2) + y s); AdelaiDet and mmdetection too) or
    # "torchvision" (its anchor centers: x * step with no offset, the step being the padded
    # input size // the level's grid size, less than the stride on P6/P7 of most inputs), for
    # torchvision's converted weights.
    fcos.LOCATION_GRID = "half_stride"
    # Focal loss (Sec. 3.1, following RetinaNet).
    fcos.LOSS_ALPHA = 0.25
    fcos.LOSS_GAMMA = 2.0
    # Boundaries m_3..m_6 of the per-level regression ranges (Sec. 3.2); m_2 = 0 and m_7 = inf.
    fcos.SIZES_OF_INTEREST = [64, 128, 256, 512]
    # ours: regression activation, relu(s_i * x) (improved) or exp(s_i * x) (paper, Sec. 3.2).
    fcos.BOX_ACTIVATION = "relu"
    # ours: with "exp", the (l, t, r, b) every location predicts at initialisation, in target units.
    # 0 means one stride: 1 for stride-normalized targets (the authors' zero bias) and the first
    # level's stride for pixel targets, where the authors' 1-pixel start stalls SGD (README, "The
    # ICCV 2019 settings"); 1.0 with pixel targets gives the original release's initialisation.
    fcos.INITIAL_BOX_DISTANCE = 0.0
    fcos.USE_DEFORMABLE = False
    # Tower depth of each branch (Fig. 2: four 3x3 convs).
    fcos.NUM_CLS_CONVS = 4
    fcos.NUM_BOX_CONVS = 4
    fcos.NUM_SHARE_CONVS = 0
    # ours: recompute the towers in the backward pass instead of keeping their activations (less
    # training memory, a few percent more time, same results; not with BN / SyncBN).
    fcos.CHECKPOINT_TOWERS = False
    fcos.CENTER_SAMPLE = True
    fcos.POS_RADIUS = 1.5
    fcos.LOC_LOSS_TYPE = "giou"  # "iou" (-ln IoU, UnitBox), "linear_iou" or "giou"
    fcos.LOSS_NORMALIZER_CLS = "fg"  # "fg", "moving_fg" or "all"
    fcos.LOSS_WEIGHT_CLS = 1.0
    fcos.BOX_QUALITY = "ctrness"  # "ctrness" or "iou"
    # ours: regression targets divided by the level's stride (Table 3 "+ Normalization").
    fcos.NORM_REG_TARGETS = True
    # ours: center-ness branch on the box tower (True, improved) or the cls tower (paper, Fig. 2).
    fcos.CENTERNESS_ON_REG = True
    # ours: final score sqrt(cls * quality) (True, improved) or cls * quality (paper).
    fcos.SCORE_SQRT = True
    # ours: box loss weighted by the center-ness targets and normalized by their sum ("ctrness",
    # improved) or unweighted and normalized by the number of positives ("none", eq. (2)).
    fcos.REG_LOSS_WEIGHTING = "ctrness"
    # ours: what multiplies the class score at inference (Table 4 and arXiv Sec. 4.1.2): "branch"
    # (the center-ness or IoU branch), "none", "from_regression" (center-ness of the predicted
    # l,t,r,b) or "oracle" (ground-truth center-ness of each location; needs annotated inputs).
    fcos.INFERENCE_QUALITY = "branch"
    # ours: cap on (locations x boxes) elements evaluated at once by target assignment, which keeps
    # memory bounded for images with thousands of boxes.
    fcos.TARGETS_MAX_PAIRS_PER_CHUNK = 1 << 22
