"""Writing images: create, convert, compare and resize over the common model."""
