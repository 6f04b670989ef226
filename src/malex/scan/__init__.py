"""Scans of large sources: parts with fixed names, streamed on one machine or screened by Ray actors, resumable."""

from malex.scan.run import ScanReport, ScanSettings, scan_to_folder

__all__ = ["ScanReport", "ScanSettings", "scan_to_folder"]
