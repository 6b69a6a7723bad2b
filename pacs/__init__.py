"""The DICOM side of vnpacs: DIMSE server and clients, settings, the `vnpacs` command line, app wiring."""
