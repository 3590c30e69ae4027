"""One DICOM instance in, one outcome out: the step STOW-RS (`POST /v1/studies`) and the C-STORE node
(`python -m service.dicom_node`) share. It runs the instance through the diagnose use case (`service.diagnosis`),
which counts it in the metrics and appends it to the decision record, and turns a refusal into the DICOM status of
its domain error (`service.errors`: the C-STORE status, also the STOW-RS Failure Reason).

What is logged per instance: the request id, the protocol, the SOP class (a kind of object, not a patient's), the
outcome. Never patient attributes, never the SOP Instance UID (a per-study identifier in de-identification terms).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from pydicom.uid import UID

from service import diagnosis
from service.decode import dicom_uids
from service.diagnosis import Diagnosis
from service.errors import NotReady, PayloadTooLarge, ServiceError
from service.state import ServiceState

log = structlog.get_logger("aegis.dicom")
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class InstanceOutcome:
    sop_class_uid: str | None  # None when the bytes are not a readable DICOM file
    sop_instance_uid: str | None
    result: Diagnosis | None = None  # the answer, or
    reason: str | None = None  # the refusal: the domain error's reason, message and DICOM status
    detail: str | None = None
    status: int = SUCCESS

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def retriable(self) -> bool:
        """Refused for lack of resources (queue full, timeout, not ready): the same instance may pass later."""
        return 0xA700 <= self.status <= 0xA7FF


async def diagnose_instance(state: ServiceState, data: bytes, *, request_id: str, source: str,
                            key_id: str | None = None, **log_fields) -> InstanceOutcome:
    """Diagnose one DICOM Part 10 instance; every refusal (and any bug) becomes an outcome, never an exception, so
    that one bad instance never costs the others their answer."""
    sop_class, sop_instance = await asyncio.to_thread(dicom_uids, data)

    async def read() -> tuple[bytes, str]:
        limit = state.settings.max_upload_bytes  # the same limit as an upload (a C-STORE has no HTTP body)
        if len(data) > limit:
            raise PayloadTooLarge(f"instance of {len(data)} bytes exceeds the limit of {limit} bytes")
        return data, "application/dicom"

    try:
        if not state.ready or state.pipeline is None:
            raise NotReady("the model is not loaded and warmed up yet")
        result = await diagnosis.diagnose(state, read, request_id=request_id, key_id=key_id, source=source)
    except ServiceError as error:
        outcome = InstanceOutcome(sop_class, sop_instance, reason=error.reason, detail=error.message,
                                  status=error.dicom_status)
    except Exception as error:  # noqa: BLE001 - a bug must not take the other instances down; logged below
        log.error("internal_error", request_id=request_id, source=source, error_type=type(error).__name__)
        outcome = InstanceOutcome(sop_class, sop_instance, reason="internal", status=PROCESSING_FAILURE,
                                  detail="internal error; the request id identifies it in the logs")
    else:
        outcome = InstanceOutcome(sop_class, sop_instance, result=result)
    _count_and_log(state, outcome, request_id=request_id, source=source, **log_fields)
    return outcome


def _count_and_log(state: ServiceState, outcome: InstanceOutcome, **fields) -> None:
    if outcome.sop_class_uid is not None:
        fields["sop_class"] = UID(outcome.sop_class_uid).name
    if outcome.ok:
        verdict, decoded = outcome.result.verdict, outcome.result.decoded
        log.info("dicom_instance", outcome="diagnosed", width=decoded.width, height=decoded.height,
                 diagnosis=verdict.diagnosis, decision=verdict.decision,
                 shield_logit=round(verdict.shield_logit, 4), **fields)
        return
    state.metrics.request_errors.labels(reason=outcome.reason).inc()
    log.info("dicom_instance", outcome="refused", reason=outcome.reason, status=f"0x{outcome.status:04X}",
             detail=outcome.detail, **fields)
