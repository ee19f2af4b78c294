#![allow(dead_code)]

pub mod harness;
pub mod kube_double;
pub mod oidc;
pub mod operator;
pub mod refresh_recovery;
pub mod scenarios;
