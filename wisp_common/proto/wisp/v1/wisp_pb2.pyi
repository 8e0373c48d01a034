from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class ModelIdentity(_message.Message):
    __slots__ = ("name", "tokenizer_fingerprint", "vocab_size", "target_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tokenizer_fingerprint: str
    vocab_size: int
    target_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., target_fingerprint: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class StopCondition(_message.Message):
    __slots__ = ("max_new_tokens", "stop_token_ids", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Slo(_message.Message):
    __slots__ = ("ttft_seconds", "tpot_seconds")
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TPOT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ttft_seconds: float
    tpot_seconds: float
    def __init__(self, ttft_seconds: _Optional[float] = ..., tpot_seconds: _Optional[float] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "kind")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    kind: str
    def __init__(self, device_id: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("draft_model", "prompt_token_ids", "committed_token_ids", "sampling", "stop", "slo", "device", "return_features", "accept_server_decoding", "server_paced", "known_features", "feature_layers")
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RETURN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_SERVER_DECODING_FIELD_NUMBER: _ClassVar[int]
    SERVER_PACED_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    draft_model: ModelIdentity
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    committed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    stop: StopCondition
    slo: Slo
    device: DeviceInfo
    return_features: bool
    accept_server_decoding: bool
    server_paced: bool
    known_features: int
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, draft_model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., committed_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Union[StopCondition, _Mapping]] = ..., slo: _Optional[_Union[Slo, _Mapping]] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., return_features: _Optional[bool] = ..., accept_server_decoding: _Optional[bool] = ..., server_paced: _Optional[bool] = ..., known_features: _Optional[int] = ..., feature_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class DraftRound(_message.Message):
    __slots__ = ("round", "position", "token_ids", "draft_probabilities", "branch_token_ids")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    BRANCH_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probabilities: _containers.RepeatedCompositeFieldContainer[DraftProbabilities]
    branch_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., draft_probabilities: _Optional[_Iterable[_Union[DraftProbabilities, _Mapping]]] = ..., branch_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DraftProbabilities(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpeculateRequest(_message.Message):
    __slots__ = ("open", "draft", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    draft: DraftRound
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., draft: _Optional[_Union[DraftRound, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "target_model", "position", "max_draft_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target_model: ModelIdentity
    position: int
    max_draft_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., target_model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., position: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "verify_seconds", "batch_size", "server_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    verify_seconds: float
    batch_size: int
    server_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., verify_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ..., server_seconds: _Optional[float] = ...) -> None: ...

class Hints(_message.Message):
    __slots__ = ("suggested_draft_tokens", "active_sessions", "est_queue_seconds", "est_verify_seconds")
    SUGGESTED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    EST_QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EST_VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    suggested_draft_tokens: int
    active_sessions: int
    est_queue_seconds: float
    est_verify_seconds: float
    def __init__(self, suggested_draft_tokens: _Optional[int] = ..., active_sessions: _Optional[int] = ..., est_queue_seconds: _Optional[float] = ..., est_verify_seconds: _Optional[float] = ...) -> None: ...

class TargetFeatures(_message.Message):
    __slots__ = ("position", "rows", "dim", "float16")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_FIELD_NUMBER: _ClassVar[int]
    position: int
    rows: int
    dim: int
    float16: bytes
    def __init__(self, position: _Optional[int] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., float16: _Optional[bytes] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("round", "num_accepted", "next_token", "finished", "finish_reason", "position", "timings", "hints", "features", "server_decoding", "num_drafts", "accepted_token_ids", "branch")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SERVER_DECODING_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_accepted: int
    next_token: int
    finished: bool
    finish_reason: FinishReason
    position: int
    timings: Timings
    hints: Hints
    features: TargetFeatures
    server_decoding: bool
    num_drafts: int
    accepted_token_ids: _containers.RepeatedScalarFieldContainer[int]
    branch: bool
    def __init__(self, round: _Optional[int] = ..., num_accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., position: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., hints: _Optional[_Union[Hints, _Mapping]] = ..., features: _Optional[_Union[TargetFeatures, _Mapping]] = ..., server_decoding: _Optional[bool] = ..., num_drafts: _Optional[int] = ..., accepted_token_ids: _Optional[_Iterable[int]] = ..., branch: _Optional[bool] = ...) -> None: ...

class SpeculateResponse(_message.Message):
    __slots__ = ("opened", "verdict")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    verdict: Verdict
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_token_ids", "sampling", "stop", "slo")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    stop: StopCondition
    slo: Slo
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Union[StopCondition, _Mapping]] = ..., slo: _Optional[_Union[Slo, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "finished", "finish_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: FinishReason
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("target_model", "engine", "policy", "max_draft_tokens", "max_context_tokens", "max_sessions", "version")
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    target_model: ModelIdentity
    engine: str
    policy: str
    max_draft_tokens: int
    max_context_tokens: int
    max_sessions: int
    version: str
    def __init__(self, target_model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., engine: _Optional[str] = ..., policy: _Optional[str] = ..., max_draft_tokens: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., max_sessions: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...
