fn main() {
    print!("{}", audience_token_operator::api::crds_yaml().unwrap());
}
