"""Column names and artifact file names: the one place that spells them."""

# Latent shards (encode -> pretrain/finetune)
LATENT_MEAN = "latent_mean"  # posterior mean of the encoder, unscaled (pixels for identity)
LATENT_STD = "latent_std"  # posterior std; absent for deterministic encoders
LABEL = "label"  # local label 0..K-1, the memory key (docs/method.md §1.2 "ry")
CLASS_NAME = "class_name"
SOURCE_ID = "source_id"  # where the row came from: file path or "<split>:<index>"

# Encoded-image inputs (Parquet image sources)
IMAGE_BYTES = "image"

# Distilled image sets (sample -> evaluate)
PNG = "png"
INDEX = "index"  # image k of its class; IPC k = indices 0..k-1

# Artifact files
MANIFEST = "manifest.json"  # written last: an artifact without it is incomplete
CONFIG = "config.json"  # the resolved config that made the artifact
STATS = "stats.safetensors"  # latent statistics (mean image used to centre the cosine)
