"""Documented default config (fvcore ``CfgNode``), in detectron2's key style.

Every key that a YAML file or a ``KEY VALUE`` command-line pair may set must exist here; an
unknown key is an error (see :func:`mdkd_det.config.config.merge_from_file`). Units are given in
each comment: pixels (px), Hounsfield units (HU), iterations (iter).
"""

from .cfg_node import CfgNode as CN

_C = CN()
_C.VERSION = 1

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.DEVICE = "cpu"
# Detector family, a name in META_ARCH_REGISTRY ("faster_rcnn").
_C.MODEL.META_ARCHITECTURE = "faster_rcnn"
# Task of the model (mdkd_det.tasks.TASK_REGISTRY): input mapper, evaluation, best-model metric,
# results-table columns. "detection" (COCO bbox + FROC); other tasks register their own.
_C.MODEL.TASK = "detection"
# Checkpoint to load before training/evaluation ("" = none). Our own checkpoints or a plain
# torchvision state dict.
_C.MODEL.WEIGHTS = ""
# Load checkpoints with torch.load(weights_only=False), i.e. allow them to unpickle arbitrary
# Python objects (which can run code). Off: every checkpoint (MODEL.WEIGHTS, --resume,
# KD.TEACHER_WEIGHTS, FUSION.TEACHERS, MODEL.RFDETR.*) is read with weights_only=True and a file
# that needs more is refused with a message. Turn on only for files you trust
# (tools/train_net.py --trust-checkpoints sets it). Configs are always read with yaml.safe_load.
_C.MODEL.TRUST_CHECKPOINTS = False
# Detector checkpoint of the same meta-architecture whose every non-backbone tensor (Faster
# R-CNN: rpn.*, roi_heads.*; RF-DETR: detr.*) initialises this model's heads, strictly ("" =
# from scratch). The pipeline sets it for the joint teacher when
# PIPELINE.JOINT_TEACHER_HEAD_INIT is "target_teacher" (issue 10; paper_notes A9 option).
_C.MODEL.HEAD_INIT = ""
# Per-channel mean/std applied by the detector after scaling pixels to [0, 1]
# (torchvision's GeneralizedRCNNTransform). Grey CT replicated to 3 channels.
_C.MODEL.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.MODEL.PIXEL_STD = [0.229, 0.224, 0.225]

_C.MODEL.BACKBONE = CN()
# A name in BACKBONE_REGISTRY: resnet18_fpn, resnet34_fpn, resnet50_fpn,
# mobilenet_v3_large_fpn, timm_fpn, or a plugin registered under entry point
# group "mdkd_det.backbones".
_C.MODEL.BACKBONE.NAME = "resnet18_fpn"
# Load ImageNet weights for the backbone (needs the weights cached locally; off by default).
_C.MODEL.BACKBONE.PRETRAINED = False
# Number of trainable ResNet stages (0..5), as torchvision's trainable_backbone_layers.
_C.MODEL.BACKBONE.TRAINABLE_LAYERS = 5
# Norm layer for ResNet bodies: "BN" (trainable BatchNorm, for training from scratch) or
# "FrozenBN" (torchvision's default with pretrained weights).
_C.MODEL.BACKBONE.NORM = "BN"
# timm model name for MODEL.BACKBONE.NAME == "timm_fpn" (features_only=True).
_C.MODEL.BACKBONE.TIMM_NAME = "resnet18"
# Which feature levels (indices into timm's features) feed the FPN for timm_fpn.
_C.MODEL.BACKBONE.TIMM_OUT_INDICES = [1, 2, 3, 4]

# Classification models (MODEL.META_ARCHITECTURE "image_classifier", MODEL.TASK "classification";
# paper §4.3, Tables 9/12; notes C23-C26, A15, A16).
_C.MODEL.CLASSIFIER = CN()
_C.MODEL.CLASSIFIER.NUM_CLASSES = 2
# Dropout before the final Linear (Tables 9/12 "Dropout").
_C.MODEL.CLASSIFIER.DROPOUT = 0.0
# Attention dropout of transformer blocks in the backbone (MedViT; Tables 9/12 "Attn Dropout").
_C.MODEL.CLASSIFIER.ATTN_DROPOUT = 0.0
# Eq. 14 class weights: "frequency" (w_c = 1/(f_c + EPS) from the DATASETS.TRAIN label
# histogram, rescaled so sum_c w_c f_c = 1; A15) or "none" (plain CE).
_C.MODEL.CLASSIFIER.CLASS_WEIGHTS = "frequency"
_C.MODEL.CLASSIFIER.CLASS_WEIGHT_EPS = 1e-6
# Resize inputs to this square size (px) before the backbone; 0 = keep the mapper's size.
_C.MODEL.CLASSIFIER.INPUT_SIZE = 0
# Stage depths of the MedViT-style backbone (timm Next-ViT blocks; 4 stages, stage 3 a multiple of 5).
_C.MODEL.CLASSIFIER.MEDVIT_DEPTHS = [1, 1, 5, 1]

_C.MODEL.FPN = CN()
_C.MODEL.FPN.OUT_CHANNELS = 256

# Segmentation models (MODEL.TASK "segmentation"; META_ARCHITECTURE "unet" / "tresunet"; §4.2).
_C.MODEL.SEG = CN()
# Task loss: "dice_bce" (Eq. 10; students, baselines) or "dice" (Eq. 1; Stage-1/2 teachers).
_C.MODEL.SEG.LOSS = "dice_bce"
_C.MODEL.SEG.DICE_SMOOTH = 1.0  # C16 proposal
# Foreground threshold on the sigmoid probability for the metrics.
_C.MODEL.SEG.THRESHOLD = 0.5
# UNet ("unet_encoder"): channels of the finest level (paper UNet 64) and number of poolings.
_C.MODEL.SEG.BASE_CHANNELS = 16
_C.MODEL.SEG.DEPTH = 4
# TResUNet ("tresunet_encoder"): bottleneck transformer width/layers/heads, dilation rates.
_C.MODEL.SEG.TRANSFORMER_DIM = 256
_C.MODEL.SEG.TRANSFORMER_LAYERS = 2
_C.MODEL.SEG.TRANSFORMER_HEADS = 4
_C.MODEL.SEG.DILATIONS = [1, 2, 3]

_C.MODEL.ANCHOR_GENERATOR = CN()
# One tuple of sizes (px, on the resized input) per FPN level, small first. Defaults suit
# 8-40 px nodules at ~256-512 px inputs.
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]

_C.MODEL.RPN = CN()
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 1000
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 500
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 500
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 300
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5
_C.MODEL.RPN.NMS_THRESH = 0.7

_C.MODEL.ROI_HEADS = CN()
# Foreground classes (background excluded). All built-in datasets map to one class, "lesion".
_C.MODEL.ROI_HEADS.NUM_CLASSES = 1
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 128
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.01
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
_C.MODEL.ROI_HEADS.DETECTIONS_PER_IMG = 100
# Hidden size of the TwoMLPHead box head (torchvision default 1024).
_C.MODEL.ROI_HEADS.MLP_HEAD_DIM = 1024

# RF-DETR (MODEL.META_ARCHITECTURE "rfdetr"; rfdetr package, engineering_notes §4). With
# MODEL.BACKBONE.NAME "rfdetr_dinov2" it is the plain RF-DETR (DINOv2 + projector); any other
# registry backbone gives the "plugin head" (rfdetr decoder + heads over that backbone's maps).
_C.MODEL.RFDETR = CN()
# rfdetr variant whose architecture defaults are used: "nano", "small", "medium", "large".
_C.MODEL.RFDETR.VARIANT = "nano"
# Square input size (px) the images are resized to; 0 = the variant's (Nano 384, Small 512).
# Must be a multiple of 32 for the DINOv2 encoder.
_C.MODEL.RFDETR.RESOLUTION = 0
# Object queries per group, and query groups used in training (Group DETR; eval uses 1 group).
_C.MODEL.RFDETR.NUM_QUERIES = 300
_C.MODEL.RFDETR.GROUP_DETR = 13
# Decoder width (0 = the variant's, 256); backbone maps must have this many channels.
_C.MODEL.RFDETR.HIDDEN_DIM = 0
# Decoder layers (0 = the variant's: Nano 2, Small 3).
_C.MODEL.RFDETR.DEC_LAYERS = 0
# Projector levels of the DINOv2 encoder ([] = the variant's, ["P4"]); P3/P4/P5 = stride 8/16/32 px.
_C.MODEL.RFDETR.PROJECTOR_SCALE = []
# Plugin head: backbone maps fed to the decoder ([] = all but "pool"); 1 to 3 maps, channels =
# the decoder width. E.g. ["1", "2"] = ResNet-FPN strides 8 and 16 px.
_C.MODEL.RFDETR.IN_FEATURES = []
# rfdetr checkpoint ({"model": LWDETR state dict}) loaded by name and shape ("" = none; nothing
# is ever downloaded).
_C.MODEL.RFDETR.PRETRAIN_WEIGHTS = ""
# Detector checkpoint ({"model": state dict} with "backbone.*" keys, e.g. a Faster R-CNN on the
# same registry backbone) whose backbone initialises this model's backbone ("" = from scratch).
# Ignored for MODEL.BACKBONE.NAME "fusion" (its teachers come from FUSION.TEACHERS).
_C.MODEL.RFDETR.BACKBONE_INIT = ""

# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------
_C.INPUT = CN()
# The detector resizes the shorter side to MIN_SIZE (px) and caps the longer at MAX_SIZE.
_C.INPUT.MIN_SIZE_TRAIN = 512
_C.INPUT.MAX_SIZE_TRAIN = 512
_C.INPUT.MIN_SIZE_TEST = 512
_C.INPUT.MAX_SIZE_TEST = 512
# Channels handed to the backbone; grey slices are replicated.
_C.INPUT.CHANNELS = 3
# CT window for sources that carry HU (DICOM, 16-bit PNG): level and width in HU.
# Lung window WL -600 / WW 1500 -> [-1350, 150] HU.
_C.INPUT.WINDOW = [-600.0, 1500.0]
# DeepLesion: use the per-row DICOM_windows column instead of INPUT.WINDOW.
_C.INPUT.USE_DATASET_WINDOW = False

_C.INPUT.AUG = CN()
# albumentations, all bbox-safe (applied in training only).
_C.INPUT.AUG.HFLIP_PROB = 0.5
_C.INPUT.AUG.VFLIP_PROB = 0.0
_C.INPUT.AUG.AFFINE_PROB = 0.0
_C.INPUT.AUG.AFFINE_SCALE = [0.9, 1.1]
_C.INPUT.AUG.AFFINE_TRANSLATE = 0.05  # fraction of the image size
_C.INPUT.AUG.AFFINE_ROTATE = 10.0  # degrees
_C.INPUT.AUG.BRIGHTNESS_CONTRAST_PROB = 0.0
_C.INPUT.AUG.BRIGHTNESS_LIMIT = 0.1
_C.INPUT.AUG.CONTRAST_LIMIT = 0.1
# Boxes smaller than this (px) after augmentation are dropped by albumentations.
_C.INPUT.AUG.MIN_BOX_SIZE = 1.0

# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# Root of the shared data. "" -> $MDKD_DATASETS -> ./datasets (see mdkd_det/utils/env.py).
_C.DATASETS.ROOT = ""
# Names in DatasetCatalog. A name of the form "coco:<json>:<image_dir>" registers that
# COCO dataset on the fly (no Python needed), e.g.
#   DATASETS.TRAIN "('coco:/data/train.json:/data/train_images',)"
_C.DATASETS.TRAIN = ("lungct_train",)
_C.DATASETS.TEST = ("lungct_valid",)
# Box outside the image: "clip" (clip to the image, drop if degenerate, counted warning)
# or "error" (raise DatasetError naming the file).
_C.DATASETS.BOX_POLICY = "clip"
# Keep images without boxes (negatives) in training.
_C.DATASETS.KEEP_EMPTY = True
# Seed and fractions for the deterministic patient-level split of datasets without one.
_C.DATASETS.SPLIT_SEED = 0
_C.DATASETS.SPLIT_FRACTIONS = [0.72, 0.08, 0.20]
# Share of lungct_disjoint_train's series that keeps its labels in lungct_disjoint_train_labeled;
# the rest is lungct_disjoint_train_unlabeled (boxes removed). Semi-supervised setting, paper 003.
_C.DATASETS.LABEL_FRACTION = 0.1
# Unlabelled target datasets (images only; boxes, if any, are never read). Used by the
# semi-supervised KD mode (KD.UNLABELED, paper 003 Eq. 3); never a supervised training set.
_C.DATASETS.TRAIN_UNLABELED = ()
# Lesion-patch classification datasets (tools/make_lesion_patches.py; names
# lesion_patch_<lungct|lung_pet_ct_dx|deeplesion>_<train|val|test|all>). Built on first use.
_C.DATASETS.LESION_PATCH = CN()
# Output folder ("" = $MDKD_CACHE or ~/.cache/mdkd_det, then lesion_patches_p<SIZE>_n<NEG>_s<SEED>).
_C.DATASETS.LESION_PATCH.DIR = ""
_C.DATASETS.LESION_PATCH.SIZE = 64  # stored patch side (px)
_C.DATASETS.LESION_PATCH.NEG_PER_IMAGE = 2  # lesion-free patches per slice
_C.DATASETS.LESION_PATCH.CONTEXT = 2.0  # crop side = CONTEXT x the longer box side (px)
_C.DATASETS.LESION_PATCH.MIN_SIDE = 32  # smallest crop side (px, original image)
_C.DATASETS.LESION_PATCH.SEED = 0
# Use at most this many slices per domain (seeded sample; 0 = all). For tests and smoke runs.
_C.DATASETS.LESION_PATCH.MAX_SLICES = 0
# Patient-level (train, val, test) fractions of every domain.
_C.DATASETS.LESION_PATCH.FRACTIONS = [0.7, 0.1, 0.2]
# Cap on the number of training / test images (0 = all). For tests and smoke runs.
_C.DATASETS.TRAIN_LIMIT = 0
_C.DATASETS.TEST_LIMIT = 0

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 2
# Group images of similar aspect ratio in a batch (torchvision's GroupedBatchSampler idea).
_C.DATALOADER.ASPECT_RATIO_GROUPING = True

# --------------------------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "AdamW"  # "AdamW" or "SGD"
_C.SOLVER.BASE_LR = 1e-4
_C.SOLVER.MOMENTUM = 0.9  # SGD only
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.IMS_PER_BATCH = 4  # total over all processes
_C.SOLVER.MAX_ITER = 1000
# "WarmupMultiStepLR" or "WarmupCosineLR".
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
_C.SOLVER.STEPS = (700, 900)
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.WARMUP_ITERS = 50
_C.SOLVER.WARMUP_FACTOR = 0.01
_C.SOLVER.CHECKPOINT_PERIOD = 500
_C.SOLVER.CLIP_GRADIENTS = CN()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = True
_C.SOLVER.CLIP_GRADIENTS.MAX_NORM = 5.0  # paper §6.3
_C.SOLVER.AMP = CN()
# Mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU.
_C.SOLVER.AMP.ENABLED = False

# --------------------------------------------------------------------------------------------
# Test / evaluation
# --------------------------------------------------------------------------------------------
_C.TEST = CN()
# Evaluate every N iterations (0 = only at the end). The best checkpoint by AP is kept as
# model_best.pth.
_C.TEST.EVAL_PERIOD = 0
# Also evaluate the initial model before the first iteration of a fresh run (recorded as
# iteration -1 in model_best.json), so model selection can keep the starting point. The pipeline
# turns it on for a joint teacher whose heads start from the target teacher (issue 10).
_C.TEST.EVAL_AT_START = False
# FROC operating points (false positives per image; per scan with TEST.FROC_PER_SCAN) and hit
# criterion ("iou" or "center").
_C.TEST.FROC_FPS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
_C.TEST.FROC_HIT = "iou"
_C.TEST.FROC_IOU = 0.5
# Count FROC false positives per scan (records' series_id, else patient_id; LUNA16 CPM) instead of
# per image; TEST.FROC_FPS are then FPs per scan. Hits stay per 2D box (docs/statistics.md).
_C.TEST.FROC_PER_SCAN = False
# Number of prediction-vs-ground-truth PNGs written per evaluated dataset.
_C.TEST.VIS_NUM = 4
_C.TEST.VIS_SCORE_THRESH = 0.3

# --------------------------------------------------------------------------------------------
# Misc
# --------------------------------------------------------------------------------------------
_C.OUTPUT_DIR = "./output"
_C.SEED = 0
# Write a metrics line every N iterations.
_C.LOG_PERIOD = 20

# --------------------------------------------------------------------------------------------
# Stage 1: domain-adversarial source teachers (paper Eqs. 2-6, Algorithm 1; notes C2-C5, A11, A12)
# --------------------------------------------------------------------------------------------
_C.ADVERSARIAL = CN()
_C.ADVERSARIAL.ENABLED = False
# Source dataset names (paired with DATASETS.TRAIN as the target); one teacher per source.
_C.ADVERSARIAL.SOURCE = ()
# Discriminator in DISCRIMINATOR_REGISTRY ("conv" = A11 image-level, "mlp").
_C.ADVERSARIAL.DISCRIMINATOR = "conv"
# "paper": loss = L_y + lambda*L_d with GRL(1) (Eqs. 5-6 exactly); "grl_only": GRL(lambda).
_C.ADVERSARIAL.GRAD_SCALING = "paper"
# "last" = deepest FPN map (A11); "all" = one discriminator per level, losses averaged.
_C.ADVERSARIAL.LEVELS = "last"
# lambda(rho) = 2 / (1 + exp(-GAMMA * rho)) - 1, rho = iteration / SOLVER.MAX_ITER (C4).
_C.ADVERSARIAL.GAMMA = 10.0
# Upper bound of lambda: lambda(rho) = LAMBDA_MAX * (2 / (1 + exp(-GAMMA * rho)) - 1); unitless.
# 1.0 = the paper (C4). The LungCT Faster R-CNN MDKD configs use 0.1 (docs/fidelity.md, F1).
_C.ADVERSARIAL.LAMBDA_MAX = 1.0
# Discriminator learning rate = SOLVER.BASE_LR * DISC_LR_MULT (same LR schedule); 1.0 = the
# paper (one eta in Eqs. 5-6). > 1 = two time-scale update rule (Heusel et al. 2017); x10
# collapsed the discriminator on LungCT (docs/fidelity.md, F1).
_C.ADVERSARIAL.DISC_LR_MULT = 1.0
# Gradient clipping of Stage 1 (SOLVER.CLIP_GRADIENTS.MAX_NORM, L2): "global" = one norm over
# detector + discriminator (paper §6.3); "separate" = the detector's and the discriminator's
# gradients are clipped apart, each to MAX_NORM, so a large discriminator gradient cannot
# scale down the detector's update.
_C.ADVERSARIAL.GRAD_CLIP = "global"
# Flag r of Eq. 2: 1 = the target detection loss also supervises the source teacher.
_C.ADVERSARIAL.R = 1
# Per-domain batch sizes b1 (source) and b2 (target) (A12).
_C.ADVERSARIAL.SOURCE_IMS_PER_BATCH = 2
_C.ADVERSARIAL.TARGET_IMS_PER_BATCH = 2

# --------------------------------------------------------------------------------------------
# Frozen teachers (the Stage-3 KD teacher and the FusionBackbone's teachers): how they are
# prepared and run (mdkd_det/modeling/frozen_teacher.py; docs/benchmarks.md). Speed only.
# --------------------------------------------------------------------------------------------
_C.FROZEN_TEACHER = CN()
# Fold eval BatchNorm into the preceding conv (torch.nn.utils.fusion; equal to fp32 rounding,
# not bitwise). Off by default: with it on, a joint teacher initialised as the target teacher
# (issue 10) is equal to it only to ~1e-6, not detection for detection; the measured gain is
# small (teacher forward 1.16x with both inexact switches on, docs/benchmarks.md).
_C.FROZEN_TEACHER.FOLD_BN = False
# Teacher weights and input in channels_last (NHWC) memory format (equal to fp32 rounding, not
# bitwise; off by default for the same reason).
_C.FROZEN_TEACHER.CHANNELS_LAST = False
# torch.inference_mode() instead of no_grad (bitwise equal; outputs are cloned for autograd).
_C.FROZEN_TEACHER.INFERENCE_MODE = True
# bf16 autocast for the teacher forward (CPU AMX/avx512_bf16). Not exact (~1 % of a map's
# max). Measured harmless on the CPU protocol's LungCT teachers (with FOLD_BN + CHANNELS_LAST:
# |AP change| <= 0.15 points on val and test, docs/benchmarks.md "bf16 teacher AP"); off by
# default so finished runs and the bitwise joint-teacher start stay as they are. Fastest with
# FOLD_BN and CHANNELS_LAST on (oneDNN's AMX kernels are NHWC). Takes effect only on a CPU with
# native bf16 (AVX512-BF16/AMX); elsewhere bf16 is emulated and ~6x slower, so it is dropped with
# one warning (D11.1).
_C.FROZEN_TEACHER.BF16 = False
# Disk cache of the frozen teachers' per-image maps ("" = off): the Stage-2 FusionBackbone's
# teachers and the Stage-3 KD teacher's backbone (not RF-DETR's Stage-3 teacher). A transformed
# image seen again (next epoch, another seed or extra student row on the same teacher) costs a
# disk read instead of a teacher forward. An entry holds the maps the run used, so --resume stays
# bitwise exact; maps another run computed (in other batches) differ by fp32 rounding (5e-6).
# Keyed by the teacher's weights and the exact input: one folder may serve every teacher.
# mdkd_det/modeling/teacher_cache.py, decision D11.2.
_C.FROZEN_TEACHER.CACHE_DIR = ""
# Stop storing new maps when CACHE_DIR holds this many GB (fp32: ~5.6 MB per 256-px image for a
# 256-channel FPN, per teacher) or the disk has under 1 GB free.
_C.FROZEN_TEACHER.CACHE_MAX_GB = 10.0

# --------------------------------------------------------------------------------------------
# Stage 2: joint teacher on a FusionBackbone (paper §3.2; notes C8, C11, C12, A5, A20)
# --------------------------------------------------------------------------------------------
_C.FUSION = CN()
# Fusion op in FUSION_REGISTRY: "concat1x1" (paper, detection), "concat1x1_residual" (the same
# in identity-at-init residual form, issue 10; needs OUT_CHANNELS = the teachers' width or 0) or
# "cross_attention" (A5).
_C.FUSION.OP = "concat1x1"
# Channels of every fused map; 0 = each level keeps teacher 0's channels (seg, A5).
_C.FUSION.OUT_CHANNELS = 256
# Teacher detector checkpoints (Stage-1 model_final.pth files) and their backbone names.
_C.FUSION.TEACHERS = ()
_C.FUSION.TEACHER_BACKBONES = ()
# Per-teacher input normalisation (list of [r, g, b] lists; empty = MODEL.PIXEL_MEAN/STD).
_C.FUSION.TEACHER_PIXEL_MEAN = []
_C.FUSION.TEACHER_PIXEL_STD = []
# How teacher k's maps are paired with teacher 0's levels: "keys" (same names and strides,
# required) or "stride" (nearest stride, maps resized to teacher 0's size): the latter lets a
# segmentation joint teacher fuse CT detection backbones (FPN levels) with seg encoders.
_C.FUSION.LEVEL_MATCH = "keys"
# Extra frozen teachers appended after FUSION.TEACHERS (checkpoints + backbone names), e.g.
# cross-task detection teachers ("resnet18_fpn" from an MDKD detection run) for a seg joint teacher.
_C.FUSION.EXTRA_TEACHERS = ()
_C.FUSION.EXTRA_TEACHER_BACKBONES = ()
# Teacher levels to fuse (empty = all). Classification fuses the last level only (A6).
_C.FUSION.LEVELS = ()
# "fa_blocks" op (classification, C10/A6): number of Fusion Attention blocks (Tables 9/12: 3);
# joint_ch is FUSION.OUT_CHANNELS (256 pulmonary). Attention / MLP dropout of the blocks.
_C.FUSION.FA_BLOCKS = 3
_C.FUSION.ATTN_DROPOUT = 0.0
_C.FUSION.DROPOUT = 0.0

# --------------------------------------------------------------------------------------------
# Stage 3: distillation (paper Eq. 24, §6.3; notes C27-C35, A1-A4, A8, A10, A26, A27)
# --------------------------------------------------------------------------------------------
_C.KD = CN()
_C.KD.ENABLED = False
# Joint-teacher detector checkpoint (Stage-2 model_final.pth) and its config file.
_C.KD.TEACHER_WEIGHTS = ""
_C.KD.TEACHER_CONFIG = ""
_C.KD.W_TASK = 1.0  # alpha (A13)
_C.KD.W_CON = 0.005  # beta
_C.KD.W_FALGN = 0.03  # gamma
_C.KD.W_COS = 0.03  # delta
_C.KD.W_ATT = 0.01  # eta
_C.KD.W_CLSKD = 1.0  # zeta
_C.KD.W_ROIKD = 0.10  # rho (the ROIKD weight, not the progress; A27)
_C.KD.W_KLD = 0.0  # kappa: image-level logit KD with t^2 (Eq. 15/16; classification 0.4)
_C.KD.TEMPERATURE = 2.0  # ClsKD and Con (§6.3)
_C.KD.KL_DIRECTION = "t||s"  # A2
_C.KD.CON_MASK_DIAG = False  # A1
# "softmax" (Faster R-CNN), "binary" (sigmoid heads, A10) or "auto" = the KD adapter's choice.
_C.KD.CLSKD_KIND = "auto"
# RF-DETR query pairing (A10): Hungarian match restricted to the teacher's top-K queries by
# score (0 = the student's MODEL.RFDETR.NUM_QUERIES; must be >= it).
_C.KD.QUERY_TOPK = 0
_C.KD.REDUCTION = "mean"  # or "paper" (A4)
# Curriculum factor cf: "cosine" (C34, default for detection, A26), "linear" (Table 1),
# "constant" (cf = MAX, the paper's literal detection setting).
_C.KD.CF = CN()
_C.KD.CF.SCHEDULE = "cosine"
_C.KD.CF.WARMUP = 5.0  # epochs
_C.KD.CF.RAMP = 10.0  # epochs
_C.KD.CF.MAX = 1.0
# Temperature schedule: "constant" (KD.TEMPERATURE) or "temperature" (C20 annealing).
_C.KD.TEMPERATURE_SCHEDULE = "constant"
_C.KD.T_ANNEAL = CN()
_C.KD.T_ANNEAL.FLOOR = 0.5
_C.KD.T_ANNEAL.DECAY = 0.9
_C.KD.T_ANNEAL.EVERY = 5.0
# beta (Con weight) schedule: "constant" (KD.W_CON) or "beta" (C21 ramp).
_C.KD.BETA_SCHEDULE = "constant"
_C.KD.BETA_RAMP = CN()
_C.KD.BETA_RAMP.START = 0.1
_C.KD.BETA_RAMP.END = 0.5
_C.KD.BETA_RAMP.WARMUP = 5.0
_C.KD.BETA_RAMP.RAMP = 10.0
# Classification layer selection (C26, A16): distil K layers (L1-L3); the teacher's first K
# ("early") or last K ("late") FA blocks go to the student's last K backbone levels.
_C.KD.CLS = CN()
_C.KD.CLS.K = 3
_C.KD.CLS.LAYER_SELECTION = "late"
# Iterations per schedule "epoch" (A7); 0 = one pass over the training set.
_C.KD.EPOCH_ITERS = 0
# Semi-supervised KD on unlabelled target images (paper 003 Eq. 3, detection form; issue 15):
# each KD step also draws a batch of DATASETS.TRAIN_UNLABELED, runs the student on it without
# targets (no task loss) and the frozen teacher on the same images and student regions, and adds
# loss_unlabeled_<term> = WEIGHT * cf * (KD.W_<term> * term). Off by default.
# Paper 004 (CMEDL) concurrent training: the KD teacher is not frozen but trains on its own task
# loss (the same labelled batch, weight WEIGHT, logged as loss_teacher_*) in every Stage-3 step
# while the student distils from its current weights (eval mode, no autograd into it). It starts
# from KD.TEACHER_WEIGHTS, or from scratch when that is "". Saved in the checkpoints (exact
# resume) and exported as OUTPUT_DIR/model_teacher.pth. torchvision Faster R-CNN only; not with
# FROZEN_TEACHER.FOLD_BN or CACHE_DIR. mdkd_det/distill/online_teacher.py, decision D15.10.
_C.KD.ONLINE_TEACHER = CN()
_C.KD.ONLINE_TEACHER.ENABLED = False
_C.KD.ONLINE_TEACHER.WEIGHT = 1.0
_C.KD.UNLABELED = CN()
_C.KD.UNLABELED.ENABLED = False
# Weight of the unlabelled KD terms relative to the labelled ones (dimensionless).
_C.KD.UNLABELED.WEIGHT = 1.0
# Unlabelled images per step, over all processes; 0 = SOLVER.IMS_PER_BATCH.
_C.KD.UNLABELED.IMS_PER_BATCH = 0
# KD terms applied to unlabelled images, by loss name without "loss_" (paper_notes 3.3: soft
# labels only, no hard labels): feature alignment, attention, region class KD, region embeddings.
_C.KD.UNLABELED.TERMS = ("FAlgn", "Att", "ClsKD", "ROIKD")
# KD-loss registry (issue 15; docs/kd_terms.md). KD.TERMS: the registered KD terms the
# Distiller computes, in order (default: the paper's seven, Eq. 24 / Eq. 16); any other
# registered term whose weight below is non-zero is computed after them (D15.1).
_C.KD.TERMS = ["con", "falgn", "cos", "att", "clskd", "roikd", "kld"]
# Related papers' terms (paper_notes Part 3), weight 0.0 = off (not computed). "On" values of the
# pipeline rows: docs/kd_terms.md, config presets.
_C.KD.W_KMM = 0.0  # 002 KMM, batch-Gram MSE + L1 on pooled levels (Eq. 6)
_C.KD.W_DCGD = 0.0  # 001 DCGD multi-view graph KD (Eqs. 5-8), alpha of Eq. 10
_C.KD.W_MSAN = 0.0  # 001 MSAN latent-alignment heads (Eqs. 2-4), trained as a KD term
_C.KD.W_HINT = 0.0  # 004 CMEDL hint: FAlgn on the KD.LATE_LEVELS coarsest level pairs (Eq. 2)
_C.KD.W_CTX = 0.0  # 004 CMEDL contextual loss on the late level pairs (Eqs. 3-4)
_C.KD.W_LM = 0.0  # 002 LM pixel-logit KL(s || t), segmentation students (Eq. 7)
_C.KD.W_AAM = 0.0  # 002 AAM affinity loss on pixel logits, segmentation students (Eqs. 1-4)
# Number of coarsest (deepest) paired levels the CMEDL terms (hint, ctx) read; 0 = all.
_C.KD.LATE_LEVELS = 2
_C.KD.DCGD = CN()
_C.KD.DCGD.VIEWS = 2  # photometric views per step besides the batch itself (each: +1 student
# backbone forward/backward and +1 teacher backbone forward)
_C.KD.DCGD.STRENGTH = 1.0  # scale of the view jitter (gamma/contrast/brightness +-20 %, noise 5 % std)
_C.KD.DCGD.INTER_WEIGHT = 1.0  # beta / alpha of 001 Eq. 10 (100 / 100)
_C.KD.MSAN = CN()
_C.KD.MSAN.LAMBDA = 0.5  # lambda of 001 Eq. 4
_C.KD.CTX = CN()
_C.KD.CTX.POSITIONS = 256  # positions sampled per map and image (0 = all)
_C.KD.CTX.BANDWIDTH = 0.5  # h of the contextual similarity (004 Eq. 3; D15.8)
_C.KD.AAM = CN()
_C.KD.AAM.MARGIN = 3.0  # m of 002 Eq. 2, in nats of KL (D15.7)

# --------------------------------------------------------------------------------------------
# The MDKD pipeline (baselines -> Stage 1 -> Stage 2 -> Stage 3; paper Algorithm 1)
# --------------------------------------------------------------------------------------------
_C.PIPELINE = CN()
# Run the staged pipeline instead of a single training (tools/train_net.py dispatches on it).
_C.PIPELINE.ENABLED = False
# Source datasets (one adapted teacher each). The target is DATASETS.TRAIN / DATASETS.TEST.
_C.PIPELINE.SOURCES = ()
# Stages in order; a subset runs only those (the CLI's --stage does the same).
_C.PIPELINE.STAGES = ("backbone_init", "multi_head", "dataset_specific", "target_teacher", "source_teachers",
                      "joint_teacher", "student")
# Backbone of every Stage-1 teacher (the student is MODEL.BACKBONE.NAME; A25).
_C.PIPELINE.TEACHER_BACKBONE = "resnet18_fpn"
# Iterations per stage (0 = SOLVER.MAX_ITER).
_C.PIPELINE.ITERS = CN()
_C.PIPELINE.ITERS.MULTI_HEAD = 0
_C.PIPELINE.ITERS.DATASET_SPECIFIC = 0
_C.PIPELINE.ITERS.TARGET_TEACHER = 0
_C.PIPELINE.ITERS.SOURCE_TEACHER = 0
_C.PIPELINE.ITERS.JOINT_TEACHER = 0
_C.PIPELINE.ITERS.STUDENT = 0
# Optional first stage (0 = off): train a PIPELINE.BACKBONE_INIT_ARCH detector with the same
# backbone on the target for this many iterations; its backbone initialises every non-fusion
# stage (MODEL.RFDETR.BACKBONE_INIT). The RF-DETR CPU protocol uses it (README "RF-DETR").
_C.PIPELINE.ITERS.BACKBONE_INIT = 0
_C.PIPELINE.BACKBONE_INIT_ARCH = "faster_rcnn"
# Base learning rate of the joint teacher's fusion + new heads (0 = SOLVER.BASE_LR).
_C.PIPELINE.JOINT_TEACHER_BASE_LR = 0.0
# Joint teacher's new detection head: "scratch" (paper) or "target_teacher" (A9 option, issue 10:
# start the heads -- Faster R-CNN RPN + RoI heads, RF-DETR decoder + heads -- from the Stage-1
# target teacher's, via MODEL.HEAD_INIT). With FUSION.OP "concat1x1_residual" the joint teacher
# then equals the target teacher at iteration 0.
_C.PIPELINE.JOINT_TEACHER_HEAD_INIT = "scratch"
# A24: when the target teacher has the student's architecture and schedule, it *is* the
# dataset-specific baseline; reuse its checkpoint instead of training the same run twice.
_C.PIPELINE.REUSE_TARGET_TEACHER_AS_BASELINE = False
# Stages to retrain even if their checkpoint exists.
_C.PIPELINE.RERUN = ()
# Validation dataset for model selection ("" = rows from each stage's final model). When set,
# every evaluated stage validates on it every VAL_PERIOD iterations (0 = TEST.EVAL_PERIOD, and
# always at the end), keeps model_best.pth by the task's primary metric, and reports that model
# on DATASETS.TEST[0]; later stages load the selected teachers.
_C.PIPELINE.VAL_DATASET = ""
_C.PIPELINE.VAL_PERIOD = 0
# Training seeds of the per-seed rows (CLI --seeds 0 1 2); () = one run with SEED. The teacher
# chain (backbone_init, multi_head, target_teacher, source_teachers, joint_teacher) is trained
# once, with the first seed, in OUTPUT_DIR/<stage>/; dataset_specific and student are trained for
# every seed: the first in OUTPUT_DIR/<stage>/, seed s in OUTPUT_DIR/seed_<s>/<stage>/, every
# student distilled from the shared joint teacher (docs/statistics.md).
_C.PIPELINE.SEEDS = ()
# Extra student rows (ablations, issue 15): each entry "<row name>: KEY VALUE [KEY VALUE ...]"
# (shlex-split) is applied with merge_from_list onto the student stage's config; the row is
# trained like the student (same joint teacher, schedule and seeds) in
# OUTPUT_DIR/[seed_<s>/]student_<slug of the name>/ and reported beside it in results.md with its
# paired difference to the dataset-specific row. E.g. "+unlabelled 90%: KD.UNLABELED.ENABLED True".
_C.PIPELINE.EXTRA_STUDENTS = ()
# Paired bootstrap of student - dataset_specific over the test images (detection: COCO AP/AP50):
# number of resamples (0 = no interval, per-seed differences only) and the resampling RNG seed.
_C.PIPELINE.BOOTSTRAP_RESAMPLES = 1000
_C.PIPELINE.BOOTSTRAP_SEED = 0
# A18: the runner warns when the baselines, teachers and student get different iteration counts
# or LR schedules (or the multi-head baseline sees a different number of target images than the
# dataset-specific one). True silences the warning (a deliberate, documented choice).
_C.PIPELINE.ALLOW_UNEQUAL_SCHEDULES = False
