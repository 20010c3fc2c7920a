from anylearn_sdk.server.runner import main

main()
