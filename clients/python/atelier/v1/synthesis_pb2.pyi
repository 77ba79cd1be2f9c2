from atelier.v1 import common_pb2 as _common_pb2
from atelier.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SynthesisMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNTHESIS_METHOD_UNSPECIFIED: _ClassVar[SynthesisMethod]
    GRADOP_PLUS: _ClassVar[SynthesisMethod]
    SDEDIT: _ClassVar[SynthesisMethod]

class PaintingFunction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAINTING_FUNCTION_UNSPECIFIED: _ClassVar[PaintingFunction]
    GAUSSIAN_BLUR: _ClassVar[PaintingFunction]
    MEDIAN_QUANTIZE: _ClassVar[PaintingFunction]

class InversionChoice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVERSION_CHOICE_UNSPECIFIED: _ClassVar[InversionChoice]
    INVERSION_DDIM: _ClassVar[InversionChoice]
    INVERSION_SPDINV: _ClassVar[InversionChoice]

class LambdaSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAMBDA_SCHEDULE_UNSPECIFIED: _ClassVar[LambdaSchedule]
    CONSTANT: _ClassVar[LambdaSchedule]
    LINEAR: _ClassVar[LambdaSchedule]
SYNTHESIS_METHOD_UNSPECIFIED: SynthesisMethod
GRADOP_PLUS: SynthesisMethod
SDEDIT: SynthesisMethod
PAINTING_FUNCTION_UNSPECIFIED: PaintingFunction
GAUSSIAN_BLUR: PaintingFunction
MEDIAN_QUANTIZE: PaintingFunction
INVERSION_CHOICE_UNSPECIFIED: InversionChoice
INVERSION_DDIM: InversionChoice
INVERSION_SPDINV: InversionChoice
LAMBDA_SCHEDULE_UNSPECIFIED: LambdaSchedule
CONSTANT: LambdaSchedule
LINEAR: LambdaSchedule

class Region(_message.Message):
    __slots__ = ("mask", "phrase", "color", "weight")
    MASK_FIELD_NUMBER: _ClassVar[int]
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    mask: _tensor_pb2.Mask
    phrase: str
    color: int
    weight: float
    def __init__(self, mask: _Optional[_Union[_tensor_pb2.Mask, _Mapping]] = ..., phrase: _Optional[str] = ..., color: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "scribble", "prompt", "negative_prompt", "method", "num_inference_steps", "guidance_scale", "strength", "seed", "iterative_steps", "grad_steps", "learning_rate", "painting", "regions", "region_kappa", "preview_every")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCRIBBLE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ITERATIVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GRAD_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PAINTING_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    REGION_KAPPA_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    scribble: _tensor_pb2.Image
    prompt: str
    negative_prompt: str
    method: SynthesisMethod
    num_inference_steps: int
    guidance_scale: float
    strength: float
    seed: int
    iterative_steps: int
    grad_steps: int
    learning_rate: float
    painting: PaintingFunction
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    region_kappa: float
    preview_every: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., scribble: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., method: _Optional[_Union[SynthesisMethod, str]] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., strength: _Optional[float] = ..., seed: _Optional[int] = ..., iterative_steps: _Optional[int] = ..., grad_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., painting: _Optional[_Union[PaintingFunction, str]] = ..., regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ..., region_kappa: _Optional[float] = ..., preview_every: _Optional[int] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "total", "image")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    image: _tensor_pb2.Image
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("image", "seed", "stroke_loss", "usage")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STROKE_LOSS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    image: _tensor_pb2.Image
    seed: int
    stroke_loss: float
    usage: _common_pb2.Usage
    def __init__(self, image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., seed: _Optional[int] = ..., stroke_loss: _Optional[float] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result", "preview")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: GenerateResult
    preview: Preview
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ...) -> None: ...

class VariationsRequest(_message.Message):
    __slots__ = ("model", "image", "prompt", "negative_prompt", "n", "num_inference_steps", "guidance_scale", "seed", "inversion", "lam", "lambda_schedule", "interpolation_until", "ip_adapter_scale", "dca_text", "permute", "preview_every")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INVERSION_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_UNTIL_FIELD_NUMBER: _ClassVar[int]
    IP_ADAPTER_SCALE_FIELD_NUMBER: _ClassVar[int]
    DCA_TEXT_FIELD_NUMBER: _ClassVar[int]
    PERMUTE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    image: _tensor_pb2.Image
    prompt: str
    negative_prompt: str
    n: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    inversion: InversionChoice
    lam: float
    lambda_schedule: LambdaSchedule
    interpolation_until: int
    ip_adapter_scale: float
    dca_text: str
    permute: bool
    preview_every: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., n: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., inversion: _Optional[_Union[InversionChoice, str]] = ..., lam: _Optional[float] = ..., lambda_schedule: _Optional[_Union[LambdaSchedule, str]] = ..., interpolation_until: _Optional[int] = ..., ip_adapter_scale: _Optional[float] = ..., dca_text: _Optional[str] = ..., permute: _Optional[bool] = ..., preview_every: _Optional[int] = ...) -> None: ...

class VariationsResult(_message.Message):
    __slots__ = ("images", "seed", "dca_path", "request_id", "usage", "inversion_usage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DCA_PATH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_USAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    seed: int
    dca_path: str
    request_id: str
    usage: _common_pb2.Usage
    inversion_usage: _common_pb2.Usage
    def __init__(self, images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., seed: _Optional[int] = ..., dca_path: _Optional[str] = ..., request_id: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., inversion_usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class VariationsEvent(_message.Message):
    __slots__ = ("progress", "result", "preview")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: VariationsResult
    preview: Preview
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[VariationsResult, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ...) -> None: ...
