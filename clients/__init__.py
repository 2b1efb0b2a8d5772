"""Triton gRPC client and PACS integration (DICOM node, DICOMweb, DICOM SEG)."""
