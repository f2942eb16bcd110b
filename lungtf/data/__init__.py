"""Data: ingest and check images, leakage-safe grouped splits, and the tf.data input pipeline.

Submodules (import what you need; importing this package does not import TensorFlow):
    ingest: read a class-folder dataset, the LC25000 root or a CSV manifest; check every file.
    download: fetch LC25000 with kagglehub.
    grouping: detect near-duplicate groups (flips, rotations, mild crop/brightness changes).
    split: stratified grouped splits, split manifests and the leak audit.
    augment: batch augmentation layers (flips/rotation warp, stain and colour jitter).
    pipeline: tf.data input pipeline and ``show_batch``.
"""
