//! Words with a fixed set of meanings on the wire (a job's state, an approval's), as enums.

/// An enum of wire words: each variant with its exact string, on the wire and in the
/// server's database, and `Unknown` for a word this side does not know (a newer server's),
/// kept as it was written: a client reads it, shows it and writes it back unchanged (what
/// `--json` prints is what the server sent) instead of failing on it. `Display` and
/// `as_str` give the word; `From<&str>`, `From<String>` and `FromStr` read one, never
/// failing: whether the word is known is `is_known`.
///
/// Serialized as the bare string. The fields that hold these keep `value_type = String` in
/// their OpenAPI schema, which so stays what it was.
macro_rules! wire_words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A word this side does not know (a newer server's), as it was written.
            Unknown(String),
        }

        impl $name {
            /// Every word this side knows, in the order of their declaration.
            pub const KNOWN: &'static [$name] = &[$($name::$variant),+];

            /// The word on the wire and in the server's database.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $word, )+
                    $name::Unknown(word) => word,
                }
            }

            /// Whether this side knows the word (it is not [`Self::Unknown`]).
            pub fn is_known(&self) -> bool {
                !matches!(self, $name::Unknown(_))
            }

            /// The known words, for a message: `a, b, c`.
            pub fn known_list() -> String {
                let words: Vec<&str> = $name::KNOWN.iter().map($name::as_str).collect();
                words.join(", ")
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<&str> for $name {
            fn from(word: &str) -> $name {
                match word {
                    $( $word => $name::$variant, )+
                    other => $name::Unknown(other.to_string()),
                }
            }
        }

        impl From<String> for $name {
            fn from(word: String) -> $name {
                match $name::from(word.as_str()) {
                    $name::Unknown(_) => $name::Unknown(word),
                    known => known,
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::convert::Infallible;
            fn from_str(word: &str) -> Result<$name, std::convert::Infallible> {
                Ok($name::from(word))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                <String as serde::Deserialize>::deserialize(d).map($name::from)
            }
        }
    };
}
