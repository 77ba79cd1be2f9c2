from atelier.v1 import common_pb2 as _common_pb2
from atelier.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InversionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVERSION_METHOD_UNSPECIFIED: _ClassVar[InversionMethod]
    DDIM: _ClassVar[InversionMethod]
    SPDINV: _ClassVar[InversionMethod]
    NPI: _ClassVar[InversionMethod]
    PROXNPI: _ClassVar[InversionMethod]
    DIRECT_INVERSION: _ClassVar[InversionMethod]
    NULL_TEXT: _ClassVar[InversionMethod]
    FIXED_POINT: _ClassVar[InversionMethod]

class EditEngine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_ENGINE_UNSPECIFIED: _ClassVar[EditEngine]
    P2P: _ClassVar[EditEngine]
    MASACTRL: _ClassVar[EditEngine]

class EditPreset(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_PRESET_UNSPECIFIED: _ClassVar[EditPreset]
    SPDINV_PIPELINE: _ClassVar[EditPreset]
INVERSION_METHOD_UNSPECIFIED: InversionMethod
DDIM: InversionMethod
SPDINV: InversionMethod
NPI: InversionMethod
PROXNPI: InversionMethod
DIRECT_INVERSION: InversionMethod
NULL_TEXT: InversionMethod
FIXED_POINT: InversionMethod
EDIT_ENGINE_UNSPECIFIED: EditEngine
P2P: EditEngine
MASACTRL: EditEngine
EDIT_PRESET_UNSPECIFIED: EditPreset
SPDINV_PIPELINE: EditPreset

class SPDInvOptions(_message.Message):
    __slots__ = ("max_rounds", "learning_rate", "loss_threshold", "weight_decay", "check_first")
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIRST_FIELD_NUMBER: _ClassVar[int]
    max_rounds: int
    learning_rate: float
    loss_threshold: float
    weight_decay: float
    check_first: bool
    def __init__(self, max_rounds: _Optional[int] = ..., learning_rate: _Optional[float] = ..., loss_threshold: _Optional[float] = ..., weight_decay: _Optional[float] = ..., check_first: _Optional[bool] = ...) -> None: ...

class NullTextOptions(_message.Message):
    __slots__ = ("guidance_scale",)
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    guidance_scale: float
    def __init__(self, guidance_scale: _Optional[float] = ...) -> None: ...

class FixedPointOptions(_message.Message):
    __slots__ = ("max_rounds", "loss_threshold", "anderson_memory")
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ANDERSON_MEMORY_FIELD_NUMBER: _ClassVar[int]
    max_rounds: int
    loss_threshold: float
    anderson_memory: int
    def __init__(self, max_rounds: _Optional[int] = ..., loss_threshold: _Optional[float] = ..., anderson_memory: _Optional[int] = ...) -> None: ...

class InvertRequest(_message.Message):
    __slots__ = ("model", "image", "prompt", "method", "num_inference_steps", "return_chain", "spdinv", "null_text", "fixed_point")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_CHAIN_FIELD_NUMBER: _ClassVar[int]
    SPDINV_FIELD_NUMBER: _ClassVar[int]
    NULL_TEXT_FIELD_NUMBER: _ClassVar[int]
    FIXED_POINT_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    image: _tensor_pb2.Image
    prompt: str
    method: InversionMethod
    num_inference_steps: int
    return_chain: bool
    spdinv: SPDInvOptions
    null_text: NullTextOptions
    fixed_point: FixedPointOptions
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., prompt: _Optional[str] = ..., method: _Optional[_Union[InversionMethod, str]] = ..., num_inference_steps: _Optional[int] = ..., return_chain: _Optional[bool] = ..., spdinv: _Optional[_Union[SPDInvOptions, _Mapping]] = ..., null_text: _Optional[_Union[NullTextOptions, _Mapping]] = ..., fixed_point: _Optional[_Union[FixedPointOptions, _Mapping]] = ...) -> None: ...

class StepDiagnostics(_message.Message):
    __slots__ = ("index", "timestep", "residual", "rounds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestep: int
    residual: float
    rounds: int
    def __init__(self, index: _Optional[int] = ..., timestep: _Optional[int] = ..., residual: _Optional[float] = ..., rounds: _Optional[int] = ...) -> None: ...

class InversionResult(_message.Message):
    __slots__ = ("model", "prompt", "method", "num_inference_steps", "width", "height", "z_t", "chain", "diagnostics", "usage", "null_embeddings")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    Z_T_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NULL_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    prompt: str
    method: InversionMethod
    num_inference_steps: int
    width: int
    height: int
    z_t: _tensor_pb2.Tensor
    chain: _tensor_pb2.Tensor
    diagnostics: _containers.RepeatedCompositeFieldContainer[StepDiagnostics]
    usage: _common_pb2.Usage
    null_embeddings: _tensor_pb2.Tensor
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., prompt: _Optional[str] = ..., method: _Optional[_Union[InversionMethod, str]] = ..., num_inference_steps: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., z_t: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., chain: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., diagnostics: _Optional[_Iterable[_Union[StepDiagnostics, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., null_embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class InvertEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: InversionResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[InversionResult, _Mapping]] = ...) -> None: ...

class P2POptions(_message.Message):
    __slots__ = ("mode", "cross_replace_fraction", "self_replace_fraction", "reweight", "blend_words", "blend_threshold")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[P2POptions.Mode]
        REPLACE: _ClassVar[P2POptions.Mode]
        REFINE: _ClassVar[P2POptions.Mode]
        REWEIGHT: _ClassVar[P2POptions.Mode]
    MODE_UNSPECIFIED: P2POptions.Mode
    REPLACE: P2POptions.Mode
    REFINE: P2POptions.Mode
    REWEIGHT: P2POptions.Mode
    class ReweightEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    CROSS_REPLACE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SELF_REPLACE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    REWEIGHT_FIELD_NUMBER: _ClassVar[int]
    BLEND_WORDS_FIELD_NUMBER: _ClassVar[int]
    BLEND_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    mode: P2POptions.Mode
    cross_replace_fraction: float
    self_replace_fraction: float
    reweight: _containers.ScalarMap[str, float]
    blend_words: _containers.RepeatedScalarFieldContainer[str]
    blend_threshold: float
    def __init__(self, mode: _Optional[_Union[P2POptions.Mode, str]] = ..., cross_replace_fraction: _Optional[float] = ..., self_replace_fraction: _Optional[float] = ..., reweight: _Optional[_Mapping[str, float]] = ..., blend_words: _Optional[_Iterable[str]] = ..., blend_threshold: _Optional[float] = ...) -> None: ...

class MasaCtrlOptions(_message.Message):
    __slots__ = ("start_step", "start_layer", "end_step", "mask_source_words", "mask_target_words", "mask_threshold")
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    MASK_SOURCE_WORDS_FIELD_NUMBER: _ClassVar[int]
    MASK_TARGET_WORDS_FIELD_NUMBER: _ClassVar[int]
    MASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    start_step: int
    start_layer: int
    end_step: int
    mask_source_words: _containers.RepeatedScalarFieldContainer[str]
    mask_target_words: _containers.RepeatedScalarFieldContainer[str]
    mask_threshold: float
    def __init__(self, start_step: _Optional[int] = ..., start_layer: _Optional[int] = ..., end_step: _Optional[int] = ..., mask_source_words: _Optional[_Iterable[str]] = ..., mask_target_words: _Optional[_Iterable[str]] = ..., mask_threshold: _Optional[float] = ...) -> None: ...

class ProxEditOptions(_message.Message):
    __slots__ = ("proximal_guidance", "quantile", "inversion_guidance", "inversion_guidance_timestep")
    PROXIMAL_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    INVERSION_GUIDANCE_TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    proximal_guidance: bool
    quantile: float
    inversion_guidance: bool
    inversion_guidance_timestep: int
    def __init__(self, proximal_guidance: _Optional[bool] = ..., quantile: _Optional[float] = ..., inversion_guidance: _Optional[bool] = ..., inversion_guidance_timestep: _Optional[int] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("model", "inversion", "invert", "target_prompt", "engine", "guidance_scale", "p2p", "masactrl", "return_source", "prox_edit", "preset", "concept_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INVERSION_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    P2P_FIELD_NUMBER: _ClassVar[int]
    MASACTRL_FIELD_NUMBER: _ClassVar[int]
    RETURN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROX_EDIT_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    inversion: InversionResult
    invert: InvertRequest
    target_prompt: str
    engine: EditEngine
    guidance_scale: float
    p2p: P2POptions
    masactrl: MasaCtrlOptions
    return_source: bool
    prox_edit: ProxEditOptions
    preset: EditPreset
    concept_id: str
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., inversion: _Optional[_Union[InversionResult, _Mapping]] = ..., invert: _Optional[_Union[InvertRequest, _Mapping]] = ..., target_prompt: _Optional[str] = ..., engine: _Optional[_Union[EditEngine, str]] = ..., guidance_scale: _Optional[float] = ..., p2p: _Optional[_Union[P2POptions, _Mapping]] = ..., masactrl: _Optional[_Union[MasaCtrlOptions, _Mapping]] = ..., return_source: _Optional[bool] = ..., prox_edit: _Optional[_Union[ProxEditOptions, _Mapping]] = ..., preset: _Optional[_Union[EditPreset, str]] = ..., concept_id: _Optional[str] = ...) -> None: ...

class EditResult(_message.Message):
    __slots__ = ("image", "source_image", "usage")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    image: _tensor_pb2.Image
    source_image: _tensor_pb2.Image
    usage: _common_pb2.Usage
    def __init__(self, image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., source_image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class EditEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: EditResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[EditResult, _Mapping]] = ...) -> None: ...
