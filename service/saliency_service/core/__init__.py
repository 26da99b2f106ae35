"""Transport-free core: typed values in, typed values out. Never imports grpc."""
