"""`vade report`: the HTML page, the data it reads from a scan, its plots and the drift test."""
