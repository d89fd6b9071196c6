# test_install: cmake --install of this build into a temporary prefix, then a
# consumer built against it with find_package and with pkg-config (shared and
# static, checked with ldd), and the installed plasa-train; see
# install/run.cmake. In a sanitizer build the consumers are built with the
# same -fsanitize flags (the installed library needs the runtime).
find_program(PLASA_LDD ldd)
if(NOT PKG_CONFIG_EXECUTABLE OR NOT PLASA_LDD)
  message(STATUS "test_install: pkg-config or ldd not found, test not registered")
  return()
endif()
set(PLASA_INSTALL_TRAIN OFF)
if(TARGET plasa-train)
  set(PLASA_INSTALL_TRAIN ON)
endif()
set(PLASA_INSTALL_MPIRUN "")
if(PLASA_HAVE_MPI AND MPIEXEC_EXECUTABLE)
  set(PLASA_INSTALL_MPIRUN ${MPIEXEC_EXECUTABLE})
endif()
set(PLASA_CONSUMER_FLAGS "")
if(PLASA_SANITIZE)
  set(PLASA_CONSUMER_FLAGS "-fsanitize=address,undefined -fno-omit-frame-pointer")
endif()
add_test(NAME test_install
         COMMAND ${CMAKE_COMMAND} -DBUILD_DIR=${PROJECT_BINARY_DIR}
                 -DSRC_DIR=${CMAKE_CURRENT_SOURCE_DIR}/install
                 -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/install-test
                 -DLIBDIR=${CMAKE_INSTALL_LIBDIR} -DC_COMPILER=${CMAKE_C_COMPILER}
                 "-DC_FLAGS=${PLASA_CONSUMER_FLAGS}" -DPKG_CONFIG=${PKG_CONFIG_EXECUTABLE}
                 -DLDD=${PLASA_LDD} -DTRAIN=${PLASA_INSTALL_TRAIN}
                 -DMPIRUN=${PLASA_INSTALL_MPIRUN}
                 -P ${CMAKE_CURRENT_SOURCE_DIR}/install/run.cmake)
set_tests_properties(test_install PROPERTIES TIMEOUT 300 ENVIRONMENT
  "OMP_NUM_THREADS=1;LSAN_OPTIONS=suppressions=${CMAKE_CURRENT_SOURCE_DIR}/mpi/lsan.supp:print_suppressions=0:fast_unwind_on_malloc=0")
