from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

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
