//! `/api/v1/users`: users, their roles and their tokens.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::path::{segment, PathError};

/// What a user may do on a vault; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees everything: vaults, policies, items, points, jobs.
    Reader,
    /// Backs up and restores.
    Operator,
    /// Manages policies and protected items, deletes and undeletes points.
    Contributor,
    /// Users, tokens, vault settings, lock, approvals, audit.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Reader, Role::Operator, Role::Contributor, Role::Admin];

    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Contributor => "contributor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a role (reader, operator, contributor, admin)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewToken {
    pub user: String,
    /// Shown this once: only its hash is kept.
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub name: String,
    /// Role per vault (`*`: every vault).
    pub roles: Vec<(String, Role)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoleChange {
    pub role: Role,
}

/// `GET` (`Vec<User>`), `POST` (`NewUser`, answered with `NewToken`).
pub const COLLECTION: &str = "/users";

/// `POST`: a new token (`NewToken`); `DELETE`: revoke every token of the user.
pub fn tokens_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/users/{}/tokens", segment(name)?))
}

/// `PUT` (`RoleChange`, answered with `User`).
pub fn role_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/users/{}/role", segment(name)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_back_from_their_names_and_json() {
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{r}\""));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), r);
        }
        assert_eq!(
            "superuser".parse::<Role>().unwrap_err().to_string(),
            "'superuser' is not a role (reader, operator, contributor, admin)"
        );
        assert!(Role::Reader < Role::Operator && Role::Contributor < Role::Admin);
    }
}
