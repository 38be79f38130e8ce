fn main() -> std::process::ExitCode {
    slotforge::cli::main()
}
