"""Configuration checks of both drivers, and the public API."""

from __future__ import annotations

import pytest

import mycel
import mycel_graphql
from mycel.testing import load_test_config
from mycel_graphql import GraphqlSettings, subscription_document, websocket_url

SPEC_EXAMPLE = """
connector "rabbit" { type = "memory" }
connector "db"     { type = "memory" }
connector "gql" {
  type = "graphql"
  port = 4000
  subscriptions {
    enabled   = true
    transport = "websocket"
    path      = "/graphql/ws"
    keepalive = "30s"
  }
}
flow "order_updates" {
  from { connector = "rabbit"  operation = "order.updated" }
  transform {
    id     = "input.order_id"
    status = "input.status"
  }
  to {
    connector = "gql"
    operation = "Subscription.orderUpdated"
    filter    = "input.user_id == context.connection_params.userId"
  }
}
connector "external_gql" {
  type     = "graphql"
  driver   = "client"
  endpoint = "http://other-service:4000/graphql"
  subscriptions {
    enabled = true
    path    = "/subscriptions"
  }
}
flow "react_to_price_change" {
  from { connector = "external_gql"  operation = "Subscription.priceChanged" }
  to   { connector = "db"            target = "price_updates" }
}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(mycel.ConfigError) as caught:
        load_test_config(text)
    return [str(p) for p in caught.value.problems]


def test_all_is_sorted_and_complete() -> None:
    public = {n for n in dir(mycel_graphql) if not n.startswith("_")}
    public -= {"annotations"}
    assert mycel_graphql.__all__ == sorted(mycel_graphql.__all__)
    assert set(mycel_graphql.__all__) == public


def test_spec_example_loads() -> None:
    config = load_test_config(SPEC_EXAMPLE)
    server = config.connectors["gql"].settings
    client = config.connectors["external_gql"].settings
    assert isinstance(server, GraphqlSettings)
    assert isinstance(client, GraphqlSettings)
    assert (server.driver, server.port, server.ws_path) == (
        "server",
        4000,
        "/graphql/ws",
    )
    assert server.subscriptions.keepalive == 30.0
    assert client.driver == "client"
    assert websocket_url(client.endpoint or "", client.subscriptions.path) == (
        "ws://other-service:4000/subscriptions"
    )
    to = config.flows["order_updates"].to[0]
    assert to.fan_out
    assert to.filter is not None and to.filter.indexed is not None
    assert to.filter.indexed.context_path == ("connection_params", "userId")


def test_client_needs_an_endpoint() -> None:
    assert problems('connector "c" {\n  type = "graphql"\n  driver = "client"\n}') == [
        "test.mycel:1: connector 'c': setting 'endpoint' = None: the client driver "
        'needs an endpoint, e.g. endpoint = "http://other-service:4000/graphql".'
    ]


def test_settings_of_the_other_driver_are_reported() -> None:
    text = """connector "c" {
  type     = "graphql"
  driver   = "client"
  endpoint = "http://x/graphql"
  port     = 4000
  subscriptions { keepalive = "5s" }
}
connector "s" {
  type = "graphql"
  connection_params = { a = 1 }
}"""
    assert problems(text) == [
        "test.mycel:5: connector 'c': setting 'port' = 4000: only the server driver "
        "takes this setting, and this connector has driver = 'client'.",
        "test.mycel:6: connector 'c': setting 'subscriptions' = {'keepalive': '5s'}: "
        "keepalive is a setting of the server driver, and this connector has "
        "driver = 'client'.",
        "test.mycel:10: connector 's': setting 'connection_params' = {'a': 1}: only "
        "the client driver takes this setting, and this connector has driver = "
        "'server'.",
    ]


def test_flows_must_use_the_matching_driver() -> None:
    text = """connector "m" { type = "memory" }
connector "s" { type = "graphql" }
connector "c" {
  type = "graphql"
  driver = "client"
  endpoint = "ws://x/graphql"
}
flow "wrong_source" {
  from { connector = "s"  operation = "Subscription.a" }
  to   { connector = "m"  target = "t" }
}
flow "wrong_target" {
  from { connector = "m"  operation = "t" }
  to   { connector = "c"  operation = "Subscription.a" }
}"""
    assert problems(text) == [
        "test.mycel:9: flow 'wrong_source': a flow can only read from a graphql "
        "connector with driver = 'client', and this one has driver = 'server'.",
        "test.mycel:14: flow 'wrong_target': a flow can only publish to a graphql "
        "connector with driver = 'server', and this one has driver = 'client'.",
    ]


def test_operation_must_name_a_subscription_field() -> None:
    text = """connector "m" { type = "memory" }
connector "s" { type = "graphql" }
flow "f" {
  from { connector = "m"  operation = "t" }
  to   { connector = "s"  operation = "Query.a" }
}
flow "g" {
  from { connector = "m"  operation = "t" }
  to   { connector = "s"  operation = "Subscription.${input.kind}" }
}"""
    assert problems(text) == [
        "test.mycel:5: flow 'f': connector 's' (graphql) has no target operation "
        "'Query.a'. It offers: Subscription.NAME.",
        "test.mycel:9: flow 'g': the subscription field cannot be a template: "
        "'Subscription.${input.kind}'.",
    ]


def test_client_query_must_subscribe_to_the_named_field() -> None:
    text = """connector "m" { type = "memory" }
connector "c" {
  type = "graphql"
  driver = "client"
  endpoint = "ws://x/graphql"
}
flow "f" {
  from {
    connector = "c"
    operation = "Subscription.priceChanged"
    query     = "subscription { other { id } }"
  }
  to { connector = "m"  target = "t" }
}"""
    assert problems(text) == [
        "test.mycel:10: flow 'f': the query subscribes to 'other', not to "
        "'priceChanged'."
    ]


def test_disabled_subscriptions_cannot_be_published_to() -> None:
    text = """connector "m" { type = "memory" }
connector "s" {
  type = "graphql"
  subscriptions { enabled = false }
}
flow "f" {
  from { connector = "m"  operation = "t" }
  to   { connector = "s"  operation = "Subscription.a" }
}"""
    assert problems(text) == [
        "test.mycel:8: flow 'f': subscriptions are disabled on this connector "
        "(subscriptions.enabled)."
    ]


def test_subscription_document() -> None:
    assert subscription_document("priceChanged", None) == (
        "subscription { priceChanged }",
        "priceChanged",
    )
    query = "subscription { p: priceChanged { sku } }"
    assert subscription_document("priceChanged", query) == (query, "p")
    with pytest.raises(ValueError, match=r"^the query must hold exactly one "):
        subscription_document("priceChanged", "{ priceChanged }")
    with pytest.raises(ValueError, match=r"^the query does not parse: Syntax Error"):
        subscription_document("priceChanged", "subscription {")
