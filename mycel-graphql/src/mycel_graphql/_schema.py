"""The GraphQL schema a server connector serves, and what a document asks.

The subscription fields are the ones the flows publish to. Without a schema
file each of them is of the ``JSON`` scalar, which passes the published
payload through as it is. With one, the file declares the types, and every
payload is checked against its field's type before it is published, so that
a bad payload fails its flow instead of reaching subscribers.

A subscription document is parsed and validated once per distinct text,
operation name and variables (a :class:`Plan`); the payload of a ``next``
message is then computed once per plan and published event and shared by
every subscriber with the same document.

"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLEnumType,
    GraphQLError,
    GraphQLField,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    OperationDefinitionNode,
    OperationType,
    build_ast_schema,
    execute_sync,
    get_named_type,
    get_operation_ast,
    is_abstract_type,
    is_leaf_type,
    parse,
    validate,
)
from graphql.execution.values import get_argument_values
from graphql.language import ast

from mycel.errors import ConnectorError

__all__ = ["JSON_SCALAR", "Plan", "SchemaBuilder", "ServedSchema", "dumps"]


def dumps(value: Any) -> str:
    """Compact JSON, as sent on the wire."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _identity(value: Any) -> Any:
    return value


def _parse_literal(node: ast.ValueNode, variables: Any = None) -> Any:
    from graphql import value_from_ast_untyped

    return value_from_ast_untyped(node, variables)


JSON_SCALAR = GraphQLScalarType(
    "JSON",
    description="Any JSON value, passed through as published.",
    serialize=_identity,
    parse_value=_identity,
    parse_literal=_parse_literal,
)

_DEFAULT_SDL = '''
"""Served by Mycel: subscription fields come from the flows."""
type Query {
  """Always true: the server is up."""
  _mycel: Boolean!
}
'''


class SchemaBuilder:
    """Builds the served schema from the bound fields and a schema file."""

    def __init__(self, fields: Sequence[str], schema_file: Path | None) -> None:
        self.fields = list(dict.fromkeys(fields))
        self.schema_file = schema_file

    def build(self) -> ServedSchema:
        if self.schema_file is None:
            return ServedSchema(self._generated(), typed=False)
        return ServedSchema(self._from_file(self.schema_file), typed=True)

    def _generated(self) -> GraphQLSchema:
        lines = [f"  {name}: JSON" for name in self.fields] or ["  _mycel: JSON"]
        sdl = (
            _DEFAULT_SDL
            + "scalar JSON\ntype Subscription {\n"
            + "\n".join(lines)
            + "\n}\n"
        )
        schema = build_ast_schema(parse(sdl))
        schema.type_map["JSON"] = JSON_SCALAR
        _replace_json(schema)
        return schema

    def _from_file(self, path: Path) -> GraphQLSchema:
        try:
            sdl = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConnectorError(
                f"cannot read the schema file {str(path)!r}: {exc.strerror or exc}"
            ) from exc
        try:
            document = parse(sdl)
            if not any(
                isinstance(d, ast.ObjectTypeDefinitionNode) and d.name.value == "Query"
                for d in document.definitions
            ):
                document = parse(_DEFAULT_SDL + sdl)
            schema = build_ast_schema(document)
        except (GraphQLError, TypeError) as exc:
            raise ConnectorError(f"schema file {str(path)!r}: {exc}") from exc
        if "JSON" in schema.type_map:
            _replace_json(schema)
        subscription = schema.subscription_type
        declared = set(subscription.fields) if subscription else set()
        missing = [name for name in self.fields if name not in declared]
        if missing:
            raise ConnectorError(
                f"schema file {str(path)!r} declares no Subscription field "
                f"{', '.join(repr(m) for m in missing)}; the flows publish to it"
            )
        return schema


def _replace_json(schema: GraphQLSchema) -> None:
    """Make every ``JSON`` scalar pass values through unchanged."""
    declared = schema.type_map["JSON"]
    if not isinstance(declared, GraphQLScalarType):
        return
    declared.serialize = _identity  # type: ignore[method-assign]
    declared.parse_value = _identity  # type: ignore[method-assign]
    declared.parse_literal = _parse_literal  # type: ignore[method-assign]


class ServedSchema:
    """The schema, plus the checks and plans derived from it."""

    def __init__(self, schema: GraphQLSchema, *, typed: bool) -> None:
        self.schema = schema
        self.typed = typed
        subscription = schema.subscription_type
        self.subscription_fields: Mapping[str, GraphQLField] = (
            subscription.fields if subscription else {}
        )
        self._plans: OrderedDict[tuple[str, str | None, str], Plan | list[Any]] = (
            OrderedDict()
        )

    def check_payload(self, field: str, payload: Any) -> str | None:
        """Why ``payload`` does not fit ``Subscription.field``, or None."""
        if not self.typed:
            return None
        definition = self.subscription_fields.get(field)
        if definition is None:
            return f"the schema declares no Subscription field {field!r}"
        return _check_value(definition.type, payload, field)

    def plan(
        self,
        query: str,
        operation_name: str | None,
        variables: Mapping[str, Any] | None,
    ) -> Plan | list[dict[str, Any]]:
        """A plan for one document, or its errors (formatted for the wire).

        Plans are kept for the 256 most recently used documents.

        """
        key = (query, operation_name, dumps(variables) if variables else "")
        found = self._plans.get(key)
        if found is not None:
            self._plans.move_to_end(key)
            return found
        made = self._make_plan(query, operation_name, variables or {})
        self._plans[key] = made
        if len(self._plans) > 256:
            self._plans.popitem(last=False)
        return made

    def _make_plan(
        self, query: str, operation_name: str | None, variables: Mapping[str, Any]
    ) -> Plan | list[dict[str, Any]]:
        # Parse and validate the document as any GraphQL server would.
        try:
            document = parse(query)
        except GraphQLError as exc:
            return [dict(exc.formatted)]
        errors = validate(self.schema, document)
        if errors:
            return [dict(error.formatted) for error in errors]
        operation = get_operation_ast(document, operation_name)
        if operation is None:
            message = (
                f"Unknown operation named '{operation_name}'."
                if operation_name
                else "Must provide an operation."
            )
            return [{"message": message}]

        # A query or mutation is answered once; a subscription names a field.
        if operation.operation != OperationType.SUBSCRIPTION:
            return Plan(
                self,
                document,
                operation=operation,
                variables=variables,
                field=None,
                key="",
                args={},
            )
        node = operation.selection_set.selections[0]
        if not isinstance(node, FieldNode):
            return [{"message": "a subscription must select its field directly"}]
        field_name = node.name.value
        definition = self.subscription_fields[field_name]
        try:
            from graphql.execution.values import get_variable_values

            coerced = get_variable_values(
                self.schema, operation.variable_definitions or (), dict(variables)
            )
            if isinstance(coerced, list):
                return [dict(error.formatted) for error in coerced]
            args = get_argument_values(definition, node, coerced)
        except GraphQLError as exc:
            return [dict(exc.formatted)]
        key = node.alias.value if node.alias else field_name
        return Plan(
            self,
            document,
            operation=operation,
            variables=variables,
            field=field_name,
            key=key,
            args=args,
        )


class Plan:
    """One validated document: what it subscribes to and how to answer it.

    ``field`` is the subscription field (None for a query), ``key`` its
    response key (the alias, if any), ``args`` its coerced arguments.

    """

    __slots__ = (
        "_fast",
        "_prefix",
        "args",
        "document",
        "field",
        "key",
        "operation",
        "served",
        "variables",
    )

    def __init__(
        self,
        served: ServedSchema,
        document: DocumentNode,
        *,
        operation: OperationDefinitionNode,
        variables: Mapping[str, Any],
        field: str | None,
        key: str,
        args: dict[str, Any],
    ) -> None:
        self.served = served
        self.document = document
        self.operation = operation
        self.variables = variables
        self.field = field
        self.key = key
        self.args = args
        # A leaf field without directives needs no execution per event.
        self._fast = False
        if field is not None:
            node = operation.selection_set.selections[0]
            named = get_named_type(served.subscription_fields[field].type)
            self._fast = (
                (named is JSON_SCALAR or named.name == "JSON")
                and not node.directives
                and not operation.directives
            )
        self._prefix = '{"data":{' + dumps(key) + ":"

    def execute_once(self) -> dict[str, Any]:
        """The result of a query or mutation document."""
        result = execute_sync(
            self.served.schema,
            self.document,
            root_value={"_mycel": True},
            variable_values=dict(self.variables),
            operation_name=(self.operation.name.value if self.operation.name else None),
        )
        return _formatted(result.data, result.errors)

    def payload_json(self, payload: Any, cache: dict[Any, Any]) -> str:
        """The JSON ``payload`` of a ``next`` message for one event.

        ``cache`` is the published message's cache: one encoding per plan
        and event, shared by every subscriber.

        """
        found = cache.get(self)
        if found is not None:
            return found  # type: ignore[no-any-return]
        if self._fast:
            encoded = cache.get("json")
            if encoded is None:
                encoded = cache["json"] = dumps(payload)
            text = self._prefix + encoded + "}}"
        else:
            assert self.field is not None
            result = execute_sync(
                self.served.schema,
                self.document,
                root_value={self.field: payload},
                variable_values=dict(self.variables),
                operation_name=(
                    self.operation.name.value if self.operation.name else None
                ),
            )
            text = dumps(_formatted(result.data, result.errors))
        cache[self] = text
        return text


def _formatted(
    data: dict[str, Any] | None, errors: Sequence[GraphQLError] | None
) -> dict[str, Any]:
    result: dict[str, Any] = {"data": data}
    if errors:
        result["errors"] = [dict(error.formatted) for error in errors]
    return result


def _check_value(type_: Any, value: Any, path: str) -> str | None:
    """Why ``value`` does not fit the GraphQL output type, or None."""
    if isinstance(type_, GraphQLNonNull):
        if value is None:
            return f"{path}: null where {type_} is declared"
        return _check_value(type_.of_type, value, path)
    if value is None:
        return None
    if isinstance(type_, GraphQLList):
        if not isinstance(value, list | tuple):
            return f"{path}: expected a list for {type_}, got {value!r}"
        for index, item in enumerate(value):
            problem = _check_value(type_.of_type, item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if isinstance(type_, GraphQLScalarType | GraphQLEnumType):
        if type_.name == "JSON":
            return None
        try:
            type_.serialize(value)
        except (GraphQLError, TypeError, ValueError) as exc:
            return f"{path}: {exc}"
        return None
    if is_abstract_type(type_):
        if not isinstance(value, Mapping) or not isinstance(
            value.get("__typename"), str
        ):
            return (
                f"{path}: a value of the abstract type {type_} needs a "
                "'__typename' naming its object type"
            )
        return None
    if isinstance(type_, GraphQLObjectType):
        if not isinstance(value, Mapping):
            return f"{path}: expected an object for {type_}, got {value!r}"
        for name, field in type_.fields.items():
            problem = _check_value(field.type, value.get(name), f"{path}.{name}")
            if problem:
                return problem
        return None
    if is_leaf_type(type_):
        return None
    return None
