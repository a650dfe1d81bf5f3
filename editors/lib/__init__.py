"""Math and utilities shared by several editors (not an editor itself)."""
