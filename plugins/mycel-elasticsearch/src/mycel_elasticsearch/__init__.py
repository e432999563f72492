"""Mycel's ``elasticsearch`` connector: flows index documents.

Works with Elasticsearch and OpenSearch through their common ``_bulk`` API.
See the distribution's README for settings, operations and guarantees.

"""

from __future__ import annotations

from ._connector import ElasticsearchConnector
from ._settings import ElasticsearchSettings, ElasticsearchToOptions

__all__ = ["ElasticsearchConnector", "ElasticsearchSettings", "ElasticsearchToOptions"]
