"""`vade demo`: a generated dataset and the fit + eval + scan + report run over it."""
