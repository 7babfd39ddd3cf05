"""Multi-GPU pipeline orchestration (see :mod:`wanstream.pipeline_parallel` for the overview and the CLI hooks)."""

from .driver import Finished, MoveRecord, PipelineDriver, num_layers_of
from .launch import LaunchSpec, run_worker, torchrun_env
from .protocol import Kind, Message, ProtocolError
from .session import PipelineSession, default_devices, renoise_seed
from .stage import PipeConfig, Stage, StageModel, load_stage_model
from .transport import PipelineError

__all__ = ["Finished", "Kind", "LaunchSpec", "Message", "MoveRecord", "PipeConfig", "PipelineDriver",
           "PipelineError", "PipelineSession", "ProtocolError", "Stage", "StageModel", "default_devices",
           "load_stage_model", "num_layers_of", "renoise_seed", "run_worker", "torchrun_env"]
