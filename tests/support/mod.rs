#![allow(dead_code)]

pub mod certs;
pub mod cluster;
pub mod harness;
pub mod kube_double;
pub mod oidc;
pub mod operator;
pub mod scenarios;
