"""EcoServe response-length predictor: trained with torch, exported to ONNX, served over gRPC."""
