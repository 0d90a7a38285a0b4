//! OpenAPI schemas of fields whose rules a derive cannot state (lists whose items have a
//! pattern): used with `#[schema(schema_with = …)]`.

use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::{RefOr, Schema};

/// A template name's (or tag's) pattern: 1–64 letters, digits, `.`, `_` or `-`, starting
/// with a letter or digit.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";

fn tags(min: usize) -> RefOr<Schema> {
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NAME_PATTERN)),
        )
        .min_items(Some(min))
        .max_items(Some(10))
        .into()
}

/// Tags to give or take: 1–10, each like a name.
pub fn some_tags() -> RefOr<Schema> {
    tags(1)
}

/// Tags a build may give: at most 10, each like a name.
pub fn build_tags() -> RefOr<Schema> {
    tags(0)
}

/// Environment variables: names of letters, digits and `_` not starting with a digit (at
/// most 256 characters), string values.
pub fn env_map() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z_][A-Za-z0-9_]{0,255}$")),
        ))
        .additional_properties(Some(AdditionalProperties::RefOr(
            ObjectBuilder::new().schema_type(Type::String).into(),
        )))
        .into()
}
