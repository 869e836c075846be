"""The paper's analyses (Sec. 4.1, appendix) as tools; run ``python -m fcos_d2.analysis --help``."""
