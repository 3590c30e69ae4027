"""Build DICOM Part 10 files in memory with pydicom (test helper, not a test module)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711-SECRET", "PatientBirthDate": "19800101"}


def make_dicom(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
               slope: float | None = None, intercept: float | None = None, window: tuple[float, float] | None = None,
               frames: int | None = None, transfer_syntax=ExplicitVRLittleEndian, encapsulated: bytes | None = None,
               rows_cols: tuple[int, int] | None = None, patient: bool = True) -> bytes:
    """`pixels`: uint8 or uint16 H x W (or F x H x W with `frames`); None for a DICOM without pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient:
        for key, value in PATIENT.items():
            setattr(ds, key, value)
    if pixels is not None or encapsulated is not None:
        shape = pixels.shape[-2:] if pixels is not None else rows_cols
        ds.Rows, ds.Columns = shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        bits = 8 if pixels is None or pixels.dtype == np.uint8 else 16
        ds.BitsAllocated = bits
        ds.BitsStored = bits_stored or bits
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        if frames is not None:
            ds.NumberOfFrames = frames
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0.0
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if encapsulated is not None:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([encapsulated])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    elif rows_cols is not None:
        ds.Rows, ds.Columns = rows_cols
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_document(kind: str = "pdf") -> bytes:
    """A non-image DICOM instance with patient data: an Encapsulated PDF ("pdf") or a Basic Text SR ("sr")."""
    from pydicom.uid import BasicTextSRStorage, EncapsulatedPDFStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage if kind == "pdf" else BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    if kind == "pdf":
        ds.Modality = "DOC"
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    else:
        ds.Modality = "SR"
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def undecodable_transfer_syntax():
    """A compressed transfer syntax no installed pydicom decoder reads (None when the decoders of every candidate are
    installed, e.g. with the `dicom-codecs` extra)."""
    from pydicom.uid import JPEGLosslessSV1, JPEGLSLossless

    from service.decode import decodable_transfer_syntaxes

    usable = set(decodable_transfer_syntaxes())
    return next((uid for uid in (JPEGLSLossless, JPEGLosslessSV1) if uid not in usable), None)
