"""saliency-service: explain, score and verbalize vision models over gRPC."""
