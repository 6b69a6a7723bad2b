"""RIS: orders from the HIS/EMR, Modality Worklist, MPPS, storage commitment, reconciliation, reports."""
