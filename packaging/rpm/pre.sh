#COMMON#
pbxra_user
