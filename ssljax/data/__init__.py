"""Host-side data: sources that hold uint8 images and int32 labels (or, streaming, read and
pre-crop them per batch), and the input pipeline that slices, prefetches and places global
batches on the device mesh."""

from __future__ import annotations

from ssljax.data.pipeline import (
    EpochSampler,
    HostLoader,
    global_batch_indices,
    to_global_array,
)
from ssljax.data.sources import (
    SOURCE_NAMES,
    ArrayOnlyUnpickler,
    ArraySource,
    build_source,
    load_arrays,
    load_cifar,
    load_fashion_mnist_idx,
    load_image_folder,
    load_tfds,
    long_tailed_subset,
    read_idx,
)
from ssljax.data.streaming import (
    STREAMING_SOURCES,
    StreamingLoader,
    StreamingSource,
    build_streaming_source,
)

__all__ = [
    "SOURCE_NAMES",
    "STREAMING_SOURCES",
    "ArrayOnlyUnpickler",
    "ArraySource",
    "EpochSampler",
    "HostLoader",
    "StreamingLoader",
    "StreamingSource",
    "build_source",
    "build_streaming_source",
    "global_batch_indices",
    "load_arrays",
    "load_cifar",
    "load_fashion_mnist_idx",
    "load_image_folder",
    "load_tfds",
    "long_tailed_subset",
    "read_idx",
    "to_global_array",
]
