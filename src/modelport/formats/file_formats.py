"""Every single-file format, in the order sniffers are tried.

Order matters only where one format is a special case of another's container: TorchScript
and ``torch.export`` archives are zips that also hold a ``data.pkl``, so they come before the
plain torch zip reader. The directory formats (``registry``) read their members through this
list, so a shard of a Hugging Face folder is recognised exactly as the file alone would be.
"""

from __future__ import annotations

from modelport.formats import (
    adapters,
    executorch_pte,
    flax_msgpack,
    ggml,
    hdf5,
    keras,
    npy,
    npz,
    onnx,
    pickle_file,
    safetensors,
    tf_bundle,
    tf_savedmodel,
    tflite,
    torch_export,
    torch_legacy,
    torch_zip,
    torchscript,
)
from modelport.formats.gguf import reader as gguf
from modelport.formats.protocol import FormatReader

FILE_READERS: tuple[FormatReader, ...] = (
    adapters.READER,  # safetensors naming a LoRA (kohya, PEFT): details added
    safetensors.READER,
    torchscript.READER,  # zips with code/ or constants.pkl: before torch_zip
    torch_export.READER,  # zips with archive_format or models/*.json: before torch_zip
    torch_zip.READER,
    torch_legacy.READER,  # pickle stream opening with torch's magic number, or 0.x tar
    npz.READER,  # zips whose members are all *.npy: after the torch archives
    npy.READER,
    gguf.READER,
    ggml.READER,  # GGUF's predecessors: ggml, ggmf, ggjt, ggla magics
    tflite.READER,  # "TFL3" at bytes 4..8
    executorch_pte.READER,  # "ET12" at bytes 4..8
    tf_bundle.READER,  # a TensorFlow checkpoint .index: 00 00 first, a LevelDB table magic last
    keras.READER,  # zips with config.json + model.weights.h5
    hdf5.READER,  # signature at 0 or 512*2^k: late, a tar of an .h5 also has one at 512
    onnx.READER,  # strict protobuf sniff (ir_version, known ModelProto fields, then a graph)
    tf_savedmodel.FILE_READER,  # saved_model.pb, keras_metadata.pb, fingerprint.pb: after ONNX
    flax_msgpack.READER,  # a msgpack map holding an ext-1 array: no magic, before pickles
    pickle_file.READER,  # plain pickles and joblib: after every binary format with a magic
)
