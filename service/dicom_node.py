"""`python -m service.dicom_node`: a DICOM node (pynetdicom) that diagnoses every image sent to it by C-STORE.

The node loads the same bundle, micro-batcher and decision record as the HTTP service (`service.main.start_state`)
and runs each received instance through the same diagnose use case, in-process (`service.dicom_store`); the
decision goes to the decision record with `source="c-store"`. It answers:
- C-ECHO (Verification): success;
- C-STORE: 0x0000 once the instance is diagnosed and recorded (a Shield rejection is a diagnosis too: look it up in
  the record), or the refusal's DICOM status (`service.errors`) with a reason in Error Comment (0000,0902): e.g.
  0x0122 for a non-image SOP class (Structured Report, Encapsulated PDF), 0xC000 for a multi-frame image, 0xA700 when
  the queue is full.
Associations are accepted only from the calling AE titles in AEGIS_DICOM_ALLOWED_CALLING_AETS (or from any with
AEGIS_DICOM_ALLOW_ANY_CALLING_AET=true) and only when addressed to AEGIS_DICOM_AE_TITLE. Every storage SOP class is
offered, with the transfer syntaxes whose pixel data can be decoded here (`service.decode.decodable_transfer_syntaxes`:
uncompressed, JPEG baseline, RLE..., plus JPEG-LS / JPEG lossless with the `dicom-codecs` extra): a sender holding a
compressed instance this node cannot decode sees its presentation context rejected ("transfer syntaxes not
supported") and converts it or reports the refusal. On SIGTERM / Ctrl-C the node stops accepting associations, lets
the running ones finish, and writes the record's queue before exiting 0.

    AEGIS_DICOM_ALLOWED_CALLING_AETS=MODALITY1,PACS python -m service.dicom_node --port 11112
    python -m pynetdicom storescu 127.0.0.1 11112 image.dcm -aet MODALITY1 -aec AEGIS     # send one image
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from service.__main__ import checked_settings
from service.decode import decodable_transfer_syntaxes
from service.dicom_store import diagnose_instance
from service.logs import configure_logging
from service.main import new_state, start_state, stop_state
from service.middleware import new_request_id
from service.state import ServiceState

log = structlog.get_logger("aegis.dicom_node")
ERROR_COMMENT_MAX = 64  # Error Comment is an LO: at most 64 characters


class DicomNode:
    """A Storage SCP + Verification SCP whose C-STORE handler diagnoses on `loop` (where `state` was started).

    pynetdicom runs each association in its own thread; the handler hands the instance to the event loop and waits
    for its outcome, so that concurrent senders share the micro-batcher like concurrent HTTP requests do."""

    def __init__(self, state: ServiceState, loop: asyncio.AbstractEventLoop):
        settings = state.settings
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name SOP instances
        if not settings.dicom_allowed_calling_aets and not settings.dicom_allow_any_calling_aet:
            raise ValueError("no calling AE title is allowed: set AEGIS_DICOM_ALLOWED_CALLING_AETS, or "
                             "AEGIS_DICOM_ALLOW_ANY_CALLING_AET=true to accept any sender")
        self.state, self.loop, self.server = state, loop, None
        ae = self.ae = AE(ae_title=settings.dicom_ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = [] if settings.dicom_allow_any_calling_aet else list(
            settings.dicom_allowed_calling_aets)
        syntaxes = decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        self.handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                         (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected)]

    def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Listen (in pynetdicom's server thread); the address really bound (port 0 picks a free one)."""
        settings = self.state.settings
        address = (host if host is not None else settings.dicom_host,
                   port if port is not None else settings.dicom_port)
        self.server = self.ae.start_server(address, block=False, evt_handlers=self.handlers)
        return self.server.server_address[:2]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; let the running associations finish (abort those still running after `timeout`)."""
        if self.server is None:
            return
        running = self.server.active_associations
        self.server.shutdown()
        for assoc in running:
            assoc.join(timeout)
            if assoc.is_alive():
                assoc.abort()
        self.server = None

    # --- handlers (pynetdicom's association threads) ------------------------------------------------------------

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event):
        request_id = new_request_id()
        calling = event.assoc.requestor.ae_title
        try:
            data = event.encoded_dataset()  # the Part 10 bytes as received: no decode / re-encode round trip
        except Exception as error:  # noqa: BLE001 - a malformed message is the sender's problem, not a crash
            log.info("dicom_instance", request_id=request_id, source="c-store", calling_ae=calling,
                     outcome="refused", reason="undecodable", error_type=type(error).__name__)
            return _status(0xC000, "the C-STORE data set could not be read")
        future = asyncio.run_coroutine_threadsafe(
            diagnose_instance(self.state, data, request_id=request_id, source="c-store", calling_ae=calling),
            self.loop)
        try:  # the diagnose use case answers within its request timeout; this bound is a safety net
            outcome = future.result(timeout=self.state.settings.request_timeout_seconds + 30)
        except TimeoutError:
            future.cancel()
            return _status(0xA700, "no answer within the request timeout")
        return 0x0000 if outcome.ok else _status(outcome.status, outcome.detail or outcome.reason or "")

    def _on_accepted(self, event) -> None:
        rejected = event.assoc.rejected_contexts
        # named: contexts refused for their transfer syntaxes (compressed, no decoder here); counted: SOP classes
        # that are not storage classes of this node (senders propose many, e.g. retired print classes)
        syntaxes = [(cx.abstract_syntax, cx.transfer_syntax) for cx in rejected if cx.result == 0x04]
        fields = {"rejected_transfer_syntaxes": _context_names(syntaxes)} if syntaxes else {}
        if len(rejected) > len(syntaxes):
            fields["rejected_sop_classes"] = len(rejected) - len(syntaxes)
        log.info("dicom_association", outcome="accepted", calling_ae=event.assoc.requestor.ae_title, **fields)

    def _on_rejected(self, event) -> None:
        log.warning("dicom_association", outcome="rejected", calling_ae=event.assoc.requestor.ae_title,
                    called_ae=event.assoc.acceptor.ae_title,
                    detail="calling AE title not allowed, or called AE title not this node's")


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    text = comment.replace("\\", "/")
    status.ErrorComment = text if len(text) <= ERROR_COMMENT_MAX else text[:ERROR_COMMENT_MAX - 3] + "..."
    return status


def _context_names(contexts: list[tuple[str, list[str]]]) -> list[str]:
    """'SOP class: transfer syntaxes' of the presentation contexts a sender proposed and the node rejected."""
    return [f"{UID(sop).name}: {', '.join(UID(ts).name for ts in syntaxes)}" for sop, syntaxes in contexts]


# --- python -m service.dicom_node ----------------------------------------------------------------------------------

async def serve(settings) -> None:
    """Start the pipeline and the node; run until SIGTERM / SIGINT; stop the node, then the pipeline."""
    state = new_state(settings)
    await start_state(state)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    node = None
    try:
        node = DicomNode(state, loop)
        host, port = node.start()
        if settings.dicom_metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.dicom_metrics_port, registry=state.metrics.registry)
        log.info("dicom_node_ready", ae_title=settings.dicom_ae_title, host=host, port=port,
                 allowed_calling_aets=list(settings.dicom_allowed_calling_aets) or "any",
                 metrics_port=settings.dicom_metrics_port or None)
        await stopping.wait()
        log.info("dicom_node_stopping")
    finally:
        if node is not None:
            await asyncio.to_thread(node.stop, settings.request_timeout_seconds)
        await stop_state(state)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.dicom_node", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="bind address (default AEGIS_DICOM_HOST, 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="default AEGIS_DICOM_PORT, 11112")
    parser.add_argument("--ae-title", default=None, help="default AEGIS_DICOM_AE_TITLE, AEGIS")
    parser.add_argument("--bundle", default=None, help="bundle folder (default: AEGIS_BUNDLE_DIR, else the embedded "
                                                       "default bundle)")
    parser.add_argument("--log-level", default=None, help="DEBUG | INFO | WARNING | ERROR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    names = {"host": "dicom_host", "port": "dicom_port", "ae_title": "dicom_ae_title", "bundle": "bundle_dir",
             "log_level": "log_level"}
    overrides = {setting: getattr(args, arg) for arg, setting in names.items() if getattr(args, arg) is not None}
    # the node has no HTTP API: API keys do not apply to it, its senders are checked by AE title
    settings = checked_settings({**overrides, "auth_disabled": True})
    if settings is None:
        return 2
    if not settings.dicom_allowed_calling_aets and not settings.dicom_allow_any_calling_aet:
        print("cannot serve: no calling AE title is allowed: set AEGIS_DICOM_ALLOWED_CALLING_AETS=AET1,AET2, or "
              "AEGIS_DICOM_ALLOW_ANY_CALLING_AET=true", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
