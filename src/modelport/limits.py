"""Every hard limit modelport puts on what a file may make it do, with the reason for each.

A file is hostile until read: a size or count it declares is checked against these before
anything is allocated or walked, and going past one raises ``LimitExceededError`` (or a
``not-analysed`` finding in a scan), never a hang, a crash or an exhausted machine. Each
limit sits far above what real model files need and far below what would hurt; the comment
says which real files set the scale. Limits that a format's specification fixes (GGML's
four dims, a zip comment's 65,535 bytes) stay with that format; caps on how much a report
lists are presentation, not safety, and stay with the report.
"""

from __future__ import annotations

from typing import Final

# -- trees: objects within objects ------------------------------------------------------------
# Containers within containers. Checkpoints, Keras configs, HDF5 groups and ONNX subgraphs
# nest a few dozen levels at most; the recursive walkers (typed JSON, the torch zip writer's
# pickler) use two frames a level, so 200 stays far below Python's recursion limit of 1000.
MAX_DEPTH: Final = 200
# Objects one tree walk may visit: a 70B-parameter checkpoint with Adam state has well under a
# million; a DAG built to explode into exponentially many paths stops here.
MAX_TREE_NODES: Final = 5_000_000
# Typed JSON read from metadata: safetensors' own header cap.
MAX_TYPED_JSON_CHARS: Final = 100 << 20
# Hex digits of one integer outside int64 (a pickle's LONG1 holds at most 255 bytes).
MAX_INT_HEX_DIGITS: Final = 4096
# Dimensions of one tensor: numpy's NPY_MAXDIMS; ONNX, TFLite and torch files stay far below.
MAX_RANK: Final = 64
# A protocol-0 pickle's text argument. CPython reads one to its newline however long it is,
# and protocol 0 writes every str and bytes value as one UNICODE or quoted STRING line (a
# model file kept in an object: megabytes), so those lines are bounded only against one that
# never ends within memory; the other text arguments (numbers, names, memo keys) are short.
MAX_PICKLE_TEXT_LINE: Final = 1 << 30
MAX_PICKLE_SHORT_LINE: Final = 1 << 20

# -- scanning ---------------------------------------------------------------------------------
# Files one directory scan visits; a model repository holds hundreds.
MAX_SCANNED_FILES: Final = 100_000
# Containers inside containers (a pickle in a zip in a compressed stream): real files use two.
MAX_CONTAINER_NESTING: Final = 4
# Pickles read from one stream: a legacy torch file has five.
MAX_PICKLES_PER_STREAM: Final = 64
# An archive member read into memory to be scanned; tensor data members are skipped instead.
MAX_SCANNED_MEMBER_BYTES: Final = 1 << 30
# A compressed pickle stream inflated to be scanned (joblib files of sklearn models: MBs).
MAX_SCAN_INFLATED_BYTES: Final = 4 << 30
# Wall-clock seconds for one file's scan; a 100 GB checkpoint's pickle scans in seconds.
SCAN_SECONDS_PER_FILE: Final = 120.0
# A text file beside a model read for chat templates; tokenizer configs are a few MB.
MAX_TEMPLATE_TEXT_BYTES: Final = 64 << 20

# -- archives and compressed streams -------------------------------------------------------------
# Entries in one zip directory: a sharded torch archive has tens of thousands.
MAX_ZIP_ENTRIES: Final = 1_000_000
# A compressed zip member inflated into memory (pickles, configs; never tensor data).
MAX_ZIP_MEMBER_INFLATED: Final = 1 << 30
# A compressed pickle's inflated size when read (joblib dumps of large arrays).
MAX_PICKLE_INFLATED: Final = 16 << 30
# A compressed pickle stream inflated (scanned or read) against its compressed size: its bytes
# are held in memory to be walked. joblib dumps of real models compress 1.2-6x with zlib, bz2
# and xz alike (float weights barely; trees, vocabularies, sparse pixels a few times), and
# an array of zeros 230x with joblib's zlib level 3; bz2 and xz reach a million to one on a
# run of one byte, so a 10 KB file would otherwise claim gigabytes.
MAX_INFLATION_RATIO: Final = 256
# What any compressed stream may inflate to whatever its ratio: a small model's pickle.
MIN_INFLATION_ALLOWANCE: Final = 64 << 20
# Object arrays pickled inside joblib streams, inside each other.
MAX_PICKLE_NESTING: Final = 16
# A .keras archive's compressed weights member inflated into memory.
MAX_KERAS_INFLATED_WEIGHTS: Final = 2 << 30
# Tar headers walked in a torch 0.x save (it has five members).
MAX_TAR_HEADERS: Final = 64
# The data of one pax or GNU long-name tar header, which tarfile reads whole: a few records.
MAX_TAR_HEADER_DATA: Final = 1 << 20

# -- headers and metadata read into memory ------------------------------------------------------
# A safetensors header: the reference library's own cap (also DCP's safetensors shards).
MAX_SAFETENSORS_HEADER: Final = 100 << 20
# A Hugging Face *.index.json: a very large model's index is a few MB.
MAX_HF_INDEX_JSON: Final = 256 << 20
# A .pt2 archive's JSON members (the serialized graph of a large model is tens of MB).
MAX_PT2_JSON: Final = 512 << 20
# A torch zip's metadata members beside data.pkl.
MAX_TORCH_ZIP_METADATA: Final = 16 << 20
# A torch.distributed.checkpoint .metadata pickle (one entry per shard of every tensor).
MAX_DCP_METADATA: Final = 1 << 30
# A .keras archive's metadata.json, and the part of it read while sniffing.
MAX_KERAS_METADATA: Final = 1 << 20
MAX_KERAS_SNIFF_METADATA: Final = 64 << 10
# A Keras model config (JSON in an attribute or a member).
MAX_KERAS_CONFIG_BYTES: Final = 64 << 20
# An .npy header: numpy's own reader refuses more than 10,000 bytes by default.
MAX_NPY_HEADER: Final = 64 << 10
# An object array's pickle, read into memory to rebuild the array's records.
MAX_NPY_PICKLE: Final = 1 << 30
# A numpy array of fixed-width text (dtype ``U`` or ``S``), decoded to strings.
MAX_NPY_TEXT: Final = 64 << 20
# The dtype map modelport writes into an .npz.
MAX_NPZ_DTYPE_MAP: Final = 64 << 20
# A file carried beside converted weights (the largest tokenizer.json files are tens of MB).
MAX_SIDECAR_BYTES: Final = 256 << 20
# TorchScript code returned as text, and read to find parameter and buffer lists.
MAX_CODE_BYTES: Final = 16 << 20
MAX_CODE_PARSE_BYTES: Final = 256 << 20
# Submodules of one TorchScript archive.
MAX_TORCHSCRIPT_MODULES: Final = 1_000_000

# -- GGUF -------------------------------------------------------------------------------------
# Arrays within arrays in metadata (real files: none).
MAX_GGUF_ARRAY_DEPTH: Final = 8
# One metadata string (chat templates are tens of KB).
MAX_GGUF_STRING: Final = 64 << 20
# String and array elements walked in one header (vocabularies hold about 250k).
MAX_GGUF_WALKED: Final = 20_000_000

# -- HDF5 -------------------------------------------------------------------------------------
# Attributes of one object, and the bytes of one attribute (Keras keeps layer names there).
MAX_HDF5_ATTRS: Final = 10_000
MAX_HDF5_ATTR_BYTES: Final = 64 << 20
# Object header continuation blocks followed for one object.
MAX_HDF5_HEADER_BLOCKS: Final = 64
# A global heap collection read into memory (variable-length strings).
MAX_HDF5_COLLECTION: Final = 1 << 30
# Links visited in one file.
MAX_HDF5_OBJECTS: Final = 1_000_000
# One dataset read through h5py (chunked or compressed data).
MAX_HDF5_READ_BYTES: Final = 16 << 30

# -- ONNX, TFLite -----------------------------------------------------------------------------
# Protobuf fields one ONNX file may make the reader visit: a 300k-node graph has about 3M,
# and each costs about a microsecond.
MAX_ONNX_FIELDS: Final = 10_000_000
# Typed-field occurrences kept for lazy decoding (writers pack a tensor's data into one).
MAX_ONNX_KEPT_FIELDS: Final = 1_000_000
# One protobuf string field decoded (names, producer, metadata values).
MAX_PROTOBUF_TEXT: Final = 1 << 20
# Flatbuffer tables and vector elements one TFLite file may make the reader visit, and the
# bytes of strings decoded from it.
MAX_FLATBUFFER_ITEMS: Final = 4_000_000
MAX_FLATBUFFER_TEXT: Final = 64 << 20
# Tensors across a TFLite model's subgraphs; real models hold well under 100k.
MAX_TFLITE_TENSORS: Final = 1_000_000
