from atelier.v1 import common_pb2 as _common_pb2
from atelier.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Point(_message.Message):
    __slots__ = ("x", "y", "label")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    label: int
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., label: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class PromptSet(_message.Message):
    __slots__ = ("points", "boxes", "mask_input")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    MASK_INPUT_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Point]
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    mask_input: _tensor_pb2.Tensor
    def __init__(self, points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., mask_input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SegmentOptions(_message.Message):
    __slots__ = ("multimask", "mask_threshold")
    MULTIMASK_FIELD_NUMBER: _ClassVar[int]
    MASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    multimask: bool
    mask_threshold: float
    def __init__(self, multimask: _Optional[bool] = ..., mask_threshold: _Optional[float] = ...) -> None: ...

class MaskCandidate(_message.Message):
    __slots__ = ("mask", "score", "low_res_logits")
    MASK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOW_RES_LOGITS_FIELD_NUMBER: _ClassVar[int]
    mask: _tensor_pb2.Mask
    score: float
    low_res_logits: _tensor_pb2.Tensor
    def __init__(self, mask: _Optional[_Union[_tensor_pb2.Mask, _Mapping]] = ..., score: _Optional[float] = ..., low_res_logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SegmentResult(_message.Message):
    __slots__ = ("candidates", "best_index")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[MaskCandidate]
    best_index: int
    def __init__(self, candidates: _Optional[_Iterable[_Union[MaskCandidate, _Mapping]]] = ..., best_index: _Optional[int] = ...) -> None: ...

class SegmentationUsage(_message.Message):
    __slots__ = ("embedding_cached", "encoder_batch_size", "usage")
    EMBEDDING_CACHED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    embedding_cached: bool
    encoder_batch_size: int
    usage: _common_pb2.Usage
    def __init__(self, embedding_cached: _Optional[bool] = ..., encoder_batch_size: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("model", "image", "prompt", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    image: _tensor_pb2.Image
    prompt: PromptSet
    options: SegmentOptions
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., prompt: _Optional[_Union[PromptSet, _Mapping]] = ..., options: _Optional[_Union[SegmentOptions, _Mapping]] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("model", "width", "height", "result", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    width: int
    height: int
    result: SegmentResult
    usage: SegmentationUsage
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., result: _Optional[_Union[SegmentResult, _Mapping]] = ..., usage: _Optional[_Union[SegmentationUsage, _Mapping]] = ...) -> None: ...

class SegmentBatchRequest(_message.Message):
    __slots__ = ("model", "image", "prompt_sets", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SETS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    image: _tensor_pb2.Image
    prompt_sets: _containers.RepeatedCompositeFieldContainer[PromptSet]
    options: SegmentOptions
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., prompt_sets: _Optional[_Iterable[_Union[PromptSet, _Mapping]]] = ..., options: _Optional[_Union[SegmentOptions, _Mapping]] = ...) -> None: ...

class SegmentBatchResponse(_message.Message):
    __slots__ = ("model", "width", "height", "results", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    width: int
    height: int
    results: _containers.RepeatedCompositeFieldContainer[SegmentResult]
    usage: SegmentationUsage
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., results: _Optional[_Iterable[_Union[SegmentResult, _Mapping]]] = ..., usage: _Optional[_Union[SegmentationUsage, _Mapping]] = ...) -> None: ...
