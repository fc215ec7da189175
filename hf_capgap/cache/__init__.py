"""The teacher cache: run the teacher once over the trainer's prepared rows and store its signal
(top-k, sampled or dense log-probs) as Arrow shards with a manifest; ``TeacherCache`` reads them back
for the trainer and refuses a cache built from other inputs.
"""

from __future__ import annotations

from hf_capgap.cache.teacher_cache import CacheCollator, CachedRows, CacheRows, TeacherCache, padded_samples

__all__ = [
    "CachedRows",
    "CacheRows",
    "CacheCollator",
    "TeacherCache",
    "padded_samples",
]
