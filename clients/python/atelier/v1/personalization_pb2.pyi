from atelier.v1 import common_pb2 as _common_pb2
from atelier.v1 import segmentation_pb2 as _segmentation_pb2
from atelier.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    PENDING: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
PENDING: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class MaskPrompt(_message.Message):
    __slots__ = ("points", "box")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[_segmentation_pb2.Point]
    box: _segmentation_pb2.Box
    def __init__(self, points: _Optional[_Iterable[_Union[_segmentation_pb2.Point, _Mapping]]] = ..., box: _Optional[_Union[_segmentation_pb2.Box, _Mapping]] = ...) -> None: ...

class EqDiffOptions(_message.Message):
    __slots__ = ("prompt_template", "steps", "learning_rate", "scale_lr", "batch_size", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm", "fdte", "p_low", "p_high", "p_original", "low_pass_half_width", "high_pass_half_width", "mgdp", "masked_loss", "mask_dilation_iterations", "rra", "time_gap", "reference_attention_loss", "reference_attention_loss_weight", "cross_attention_loss", "cross_attention_loss_weight", "custom_diffusion", "prior_preservation", "prior_loss_weight", "num_class_images", "class_image_steps", "class_image_guidance_scale")
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SCALE_LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAM_BETA1_FIELD_NUMBER: _ClassVar[int]
    ADAM_BETA2_FIELD_NUMBER: _ClassVar[int]
    ADAM_EPSILON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    FDTE_FIELD_NUMBER: _ClassVar[int]
    P_LOW_FIELD_NUMBER: _ClassVar[int]
    P_HIGH_FIELD_NUMBER: _ClassVar[int]
    P_ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    LOW_PASS_HALF_WIDTH_FIELD_NUMBER: _ClassVar[int]
    HIGH_PASS_HALF_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MGDP_FIELD_NUMBER: _ClassVar[int]
    MASKED_LOSS_FIELD_NUMBER: _ClassVar[int]
    MASK_DILATION_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RRA_FIELD_NUMBER: _ClassVar[int]
    TIME_GAP_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ATTENTION_LOSS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ATTENTION_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CROSS_ATTENTION_LOSS_FIELD_NUMBER: _ClassVar[int]
    CROSS_ATTENTION_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_DIFFUSION_FIELD_NUMBER: _ClassVar[int]
    PRIOR_PRESERVATION_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    prompt_template: str
    steps: int
    learning_rate: float
    scale_lr: bool
    batch_size: int
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    max_grad_norm: float
    fdte: bool
    p_low: float
    p_high: float
    p_original: float
    low_pass_half_width: int
    high_pass_half_width: int
    mgdp: bool
    masked_loss: bool
    mask_dilation_iterations: int
    rra: bool
    time_gap: int
    reference_attention_loss: bool
    reference_attention_loss_weight: float
    cross_attention_loss: bool
    cross_attention_loss_weight: float
    custom_diffusion: bool
    prior_preservation: bool
    prior_loss_weight: float
    num_class_images: int
    class_image_steps: int
    class_image_guidance_scale: float
    def __init__(self, prompt_template: _Optional[str] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., scale_lr: _Optional[bool] = ..., batch_size: _Optional[int] = ..., adam_beta1: _Optional[float] = ..., adam_beta2: _Optional[float] = ..., adam_epsilon: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., fdte: _Optional[bool] = ..., p_low: _Optional[float] = ..., p_high: _Optional[float] = ..., p_original: _Optional[float] = ..., low_pass_half_width: _Optional[int] = ..., high_pass_half_width: _Optional[int] = ..., mgdp: _Optional[bool] = ..., masked_loss: _Optional[bool] = ..., mask_dilation_iterations: _Optional[int] = ..., rra: _Optional[bool] = ..., time_gap: _Optional[int] = ..., reference_attention_loss: _Optional[bool] = ..., reference_attention_loss_weight: _Optional[float] = ..., cross_attention_loss: _Optional[bool] = ..., cross_attention_loss_weight: _Optional[float] = ..., custom_diffusion: _Optional[bool] = ..., prior_preservation: _Optional[bool] = ..., prior_loss_weight: _Optional[float] = ..., num_class_images: _Optional[int] = ..., class_image_steps: _Optional[int] = ..., class_image_guidance_scale: _Optional[float] = ...) -> None: ...

class LayerEditOptions(_message.Message):
    __slots__ = ("object_text", "background_text", "reference", "reference_mask", "reference_mask_prompt", "layered_optimization", "embedding_steps", "embedding_learning_rate", "alpha", "finetune", "finetune_steps", "finetune_learning_rate", "finetune_mode", "lora_rank", "object_loss", "background_loss", "object_loss_weight", "background_loss_weight", "reference_steps", "reference_guidance_scale", "iterative_guidance", "num_inference_steps", "guidance_scale", "num_images")
    OBJECT_TEXT_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_TEXT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MASK_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MASK_PROMPT_FIELD_NUMBER: _ClassVar[int]
    LAYERED_OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_STEPS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_MODE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    OBJECT_LOSS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_LOSS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    ITERATIVE_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    object_text: str
    background_text: str
    reference: _tensor_pb2.Image
    reference_mask: _tensor_pb2.Mask
    reference_mask_prompt: MaskPrompt
    layered_optimization: bool
    embedding_steps: int
    embedding_learning_rate: float
    alpha: float
    finetune: bool
    finetune_steps: int
    finetune_learning_rate: float
    finetune_mode: str
    lora_rank: int
    object_loss: bool
    background_loss: bool
    object_loss_weight: float
    background_loss_weight: float
    reference_steps: int
    reference_guidance_scale: float
    iterative_guidance: bool
    num_inference_steps: int
    guidance_scale: float
    num_images: int
    def __init__(self, object_text: _Optional[str] = ..., background_text: _Optional[str] = ..., reference: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., reference_mask: _Optional[_Union[_tensor_pb2.Mask, _Mapping]] = ..., reference_mask_prompt: _Optional[_Union[MaskPrompt, _Mapping]] = ..., layered_optimization: _Optional[bool] = ..., embedding_steps: _Optional[int] = ..., embedding_learning_rate: _Optional[float] = ..., alpha: _Optional[float] = ..., finetune: _Optional[bool] = ..., finetune_steps: _Optional[int] = ..., finetune_learning_rate: _Optional[float] = ..., finetune_mode: _Optional[str] = ..., lora_rank: _Optional[int] = ..., object_loss: _Optional[bool] = ..., background_loss: _Optional[bool] = ..., object_loss_weight: _Optional[float] = ..., background_loss_weight: _Optional[float] = ..., reference_steps: _Optional[int] = ..., reference_guidance_scale: _Optional[float] = ..., iterative_guidance: _Optional[bool] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., num_images: _Optional[int] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("model", "images", "masks", "mask_prompts", "class_word", "initializer_token", "placeholder_token", "seed", "class_images", "idempotency_key", "eqdiff", "layer_edit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    MASK_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    EQDIFF_FIELD_NUMBER: _ClassVar[int]
    LAYER_EDIT_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelRef
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    masks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Mask]
    mask_prompts: _containers.RepeatedCompositeFieldContainer[MaskPrompt]
    class_word: str
    initializer_token: str
    placeholder_token: str
    seed: int
    class_images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    idempotency_key: str
    eqdiff: EqDiffOptions
    layer_edit: LayerEditOptions
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[_tensor_pb2.Mask, _Mapping]]] = ..., mask_prompts: _Optional[_Iterable[_Union[MaskPrompt, _Mapping]]] = ..., class_word: _Optional[str] = ..., initializer_token: _Optional[str] = ..., placeholder_token: _Optional[str] = ..., seed: _Optional[int] = ..., class_images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., idempotency_key: _Optional[str] = ..., eqdiff: _Optional[_Union[EqDiffOptions, _Mapping]] = ..., layer_edit: _Optional[_Union[LayerEditOptions, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "reason", "method", "model", "step", "total_steps", "concept_id", "create_time", "start_time", "end_time", "attempts", "cancel_requested", "idempotency_key", "checkpoint_step", "placeholder_token", "next_event_index")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEXT_EVENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    reason: str
    method: str
    model: _common_pb2.ModelRef
    step: int
    total_steps: int
    concept_id: str
    create_time: float
    start_time: float
    end_time: float
    attempts: int
    cancel_requested: bool
    idempotency_key: str
    checkpoint_step: int
    placeholder_token: str
    next_event_index: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., concept_id: _Optional[str] = ..., create_time: _Optional[float] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., attempts: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., placeholder_token: _Optional[str] = ..., next_event_index: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("index", "state", "step", "total_steps", "losses", "phase", "message", "preview", "time", "concept_id")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: JobState
    step: int
    total_steps: int
    losses: _containers.ScalarMap[str, float]
    phase: str
    message: str
    preview: _tensor_pb2.Image
    time: float
    concept_id: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., phase: _Optional[str] = ..., message: _Optional[str] = ..., preview: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., time: _Optional[float] = ..., concept_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_index")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_index: int
    def __init__(self, job_id: _Optional[str] = ..., from_index: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Concept(_message.Message):
    __slots__ = ("id", "placeholder_token", "class_word", "model", "method", "job_id", "content_hash", "size_bytes", "create_time", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    placeholder_token: str
    class_word: str
    model: _common_pb2.ModelRef
    method: str
    job_id: str
    content_hash: str
    size_bytes: int
    create_time: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., placeholder_token: _Optional[str] = ..., class_word: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., method: _Optional[str] = ..., job_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., size_bytes: _Optional[int] = ..., create_time: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class ListConceptsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConceptsResponse(_message.Message):
    __slots__ = ("concepts", "next_page_token")
    CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    concepts: _containers.RepeatedCompositeFieldContainer[Concept]
    next_page_token: str
    def __init__(self, concepts: _Optional[_Iterable[_Union[Concept, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class DeleteConceptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportConceptRequest(_message.Message):
    __slots__ = ("concept_id",)
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    def __init__(self, concept_id: _Optional[str] = ...) -> None: ...

class ExportConceptResponse(_message.Message):
    __slots__ = ("concept", "safetensors")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    concept: Concept
    safetensors: bytes
    def __init__(self, concept: _Optional[_Union[Concept, _Mapping]] = ..., safetensors: _Optional[bytes] = ...) -> None: ...

class ImportConceptRequest(_message.Message):
    __slots__ = ("safetensors",)
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    def __init__(self, safetensors: _Optional[bytes] = ...) -> None: ...

class GenerateConceptRequest(_message.Message):
    __slots__ = ("concept_id", "model", "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "num_images")
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    concept_id: str
    model: _common_pb2.ModelRef
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    def __init__(self, concept_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ...) -> None: ...

class GenerateConceptResult(_message.Message):
    __slots__ = ("images", "concept_id", "model", "seed", "usage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    concept_id: str
    model: _common_pb2.ModelRef
    seed: int
    usage: _common_pb2.Usage
    def __init__(self, images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., concept_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., seed: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class GenerateConceptEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: GenerateConceptResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateConceptResult, _Mapping]] = ...) -> None: ...
