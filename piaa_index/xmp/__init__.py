"""XMP: our keywords in sidecars (exiv2), users' own keywords read back."""
