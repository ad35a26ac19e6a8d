"""The method, numpy/torch only: PVCL and open-world PVCL, PAA fusion, the tag rule, learning from labels."""
