"""Features: backbones and their weights, the fused Lite0 trunk, patch embeddings, map making."""
