"""Framework classes that configs name, and what constructing each one does.

A config loader imports the class a ``_target_`` or ``class_path`` names and calls it with
the config's arguments. The pickle rule calls every class it does not allowlist worth a look,
which is right for a class the scan knows nothing about, and wrong for the callbacks,
loggers and schedulers every LightningCLI ``config.yaml`` and NeMo ``model_config.yaml``
names: a report that is always ``suspicious`` teaches its reader to skip it. A class is
information here when its constructor only stores its arguments or builds torch layers from
numbers, runs no code the file names (a callable it takes arrives from a config only as a
target of its own, judged as such) and reaches nothing outside the process; the names are
exact (public and defining module, ``lightning.pytorch`` and ``pytorch_lightning``), so no
attribute chain or re-export reaches this table by a prefix.

Information:

- Lightning callbacks whose constructors store settings (checked in Lightning 2.6's
  ``__init__`` bodies: no file, directory, process or network is touched). During ``fit``
  they run Lightning's own code: ModelCheckpoint writes ``.ckpt`` files under ``dirpath``,
  the progress bars and summaries print.
- Lightning's file loggers (TensorBoardLogger, CSVLogger): the constructor stores
  ``save_dir``; the directory and the event or CSV files are made once training logs.
- torch's learning-rate schedulers: they store their optimizer and numbers; LambdaLR's
  function comes from a config only as a target of its own.
- NeMo's ASR neural modules that published ``model_config.yaml`` files name
  (preprocessors, spectrogram augmentation, Conformer / Squeezeformer / convolutional
  encoders and decoders, the RNN-T decoder and joint): torch layers built from numbers.

Worth a look (medium, with the reason):

- Lightning loggers that send the run elsewhere (MLFlowLogger, WandbLogger, CometLogger,
  LitLogger): metrics, hyperparameters and, with ``log_model``, checkpoints go to the server
  or account the config names.
- A NeMo model class (the ``target`` at the top of ``model_config.yaml``) is not listed:
  constructing it builds the whole model from the rest of the config, whose tokenizer section
  names files to read or a Hugging Face tokenizer to download; it is medium as any class a
  whole-model pickle constructs. So is every class of a package not named here (the user's
  own model).
- Not listed although Lightning ships them: LambdaCallback (it exists to run the callables
  it is given), BatchSizeFinder and LearningRateFinder (they run training steps and restore
  checkpoints they wrote), ModelPruning (takes a pruning function), strategies and plugins
  (they start processes).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

_LIGHTNING = ("lightning.pytorch", "pytorch_lightning")
_CALLBACK = (
    "a Lightning callback: its constructor stores its settings; during fit it runs "
    "Lightning's own code (ModelCheckpoint writes .ckpt files under its dirpath)"
)
_FILE_LOGGER = (
    "a Lightning logger that writes files: its constructor stores save_dir; the directory "
    "and its files are made when training logs"
)
_SCHEDULER = (
    "a torch learning-rate scheduler: it stores its optimizer and numbers (a function it "
    "takes comes from a config only as a target of its own, judged as such)"
)
_NEMO_MODULE = "a NeMo neural module: torch layers built from the numbers in its config"
_REMOTE_LOGGER = (
    "a Lightning logger that sends the run's metrics and hyperparameters (and, with "
    "log_model, its checkpoints) to the server or account its config names"
)

# Class -> the module under the package that defines it.
_CALLBACKS: Final = {
    "ModelCheckpoint": "model_checkpoint",
    "EarlyStopping": "early_stopping",
    "LearningRateMonitor": "lr_monitor",
    "ModelSummary": "model_summary",
    "RichModelSummary": "rich_model_summary",
    "TQDMProgressBar": "progress.tqdm_progress",
    "RichProgressBar": "progress.rich_progress",
    "Timer": "timer",
    "DeviceStatsMonitor": "device_stats_monitor",
    "GradientAccumulationScheduler": "gradient_accumulation_scheduler",
    "StochasticWeightAveraging": "stochastic_weight_avg",
}
_FILE_LOGGERS: Final = {"TensorBoardLogger": "tensorboard", "CSVLogger": "csv_logs"}
_REMOTE_LOGGERS: Final = {
    "MLFlowLogger": "mlflow",
    "WandbLogger": "wandb",
    "CometLogger": "comet",
    "LitLogger": "litlogger",
}
SCHEDULERS: Final = (
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "SequentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
    "CyclicLR",
    "CosineAnnealingWarmRestarts",
    "OneCycleLR",
)
_NEMO_ASR_MODULES: Final = {
    "AudioToMelSpectrogramPreprocessor": "audio_preprocessing",
    "AudioToMFCCPreprocessor": "audio_preprocessing",
    "SpectrogramAugmentation": "audio_preprocessing",
    "CropOrPadSpectrogramAugmentation": "audio_preprocessing",
    "ConformerEncoder": "conformer_encoder",
    "SqueezeformerEncoder": "squeezeformer_encoder",
    "ConvASREncoder": "conv_asr",
    "ConvASRDecoder": "conv_asr",
    "ConvASRDecoderClassification": "conv_asr",
    "RNNTDecoder": "rnnt",
    "RNNTJoint": "rnnt",
}


def _spelled(packages: tuple[str, ...], defined: dict[str, str], reason: str) -> dict[str, str]:
    """Each class under its package (``lightning.pytorch.callbacks.ModelCheckpoint``, how
    jsonargparse writes it) and its defining module (how older versions wrote it)."""
    names = {}
    for package in packages:
        for name, module in defined.items():
            names[f"{package}.{name}"] = reason
            names[f"{package}.{module}.{name}"] = reason
    return names


INERT: Final[MappingProxyType[str, str]] = MappingProxyType(
    {
        **_spelled(tuple(f"{p}.callbacks" for p in _LIGHTNING), _CALLBACKS, _CALLBACK),
        **_spelled(tuple(f"{p}.loggers" for p in _LIGHTNING), _FILE_LOGGERS, _FILE_LOGGER),
        **{f"torch.optim.lr_scheduler.{name}": _SCHEDULER for name in SCHEDULERS},
        **_spelled(("nemo.collections.asr.modules",), _NEMO_ASR_MODULES, _NEMO_MODULE),
    }
)
WORTH_A_LOOK: Final[MappingProxyType[str, str]] = MappingProxyType(
    _spelled(tuple(f"{p}.loggers" for p in _LIGHTNING), _REMOTE_LOGGERS, _REMOTE_LOGGER)
)
