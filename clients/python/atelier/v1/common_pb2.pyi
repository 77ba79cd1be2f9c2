from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total", "message", "elapsed_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total: int
    message: str
    elapsed_seconds: float
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("unet_forward_evaluations", "unet_backward_evaluations", "wall_seconds", "queue_seconds", "vae_decoder_backward_evaluations")
    UNET_FORWARD_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    UNET_BACKWARD_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VAE_DECODER_BACKWARD_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    unet_forward_evaluations: int
    unet_backward_evaluations: int
    wall_seconds: float
    queue_seconds: float
    vae_decoder_backward_evaluations: int
    def __init__(self, unet_forward_evaluations: _Optional[int] = ..., unet_backward_evaluations: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., vae_decoder_backward_evaluations: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "loaded", "available", "unavailable_reason", "default_guidance_scale", "dtype", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    loaded: bool
    available: bool
    unavailable_reason: str
    default_guidance_scale: float
    dtype: str
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., loaded: _Optional[bool] = ..., available: _Optional[bool] = ..., unavailable_reason: _Optional[str] = ..., default_guidance_scale: _Optional[float] = ..., dtype: _Optional[str] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
