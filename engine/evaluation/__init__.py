"""Evaluation: metrics (AUROC, AUPRO, F1-max) and `vade eval` on an MVTec-layout test split."""
